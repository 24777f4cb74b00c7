"""Prometheus metrics, defined once so the API and the workers share names and labels.

Names follow vLLM and TGI (`vllm:prompt_tokens_total`, `vllm:e2e_request_latency_seconds`,
`tgi_batch_current_size`), prefixed `lmqueue_`. Both processes use the default registry: the API
runs as one uvicorn process and a worker is one process with threads, so no multiprocess mode
is needed. The API scrapes queue depth from Redis and the store on demand (QueueCollector); a
worker serves its own registry on `LMQUEUE_WORKER_METRICS_PORT`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 14400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# --- requests ---------------------------------------------------------------------------------
JOBS_SUBMITTED = Counter("lmqueue_jobs_submitted", "Jobs accepted by the API", ["model"])
JOBS_FINISHED = Counter(
    "lmqueue_jobs_finished",
    "Jobs by final state (succeeded, failed, cancelled)",
    ["model", "status"],
)
ADMISSION_REJECTIONS = Counter(
    "lmqueue_admission_rejections", "Submissions refused with 429, by limit hit", ["limit"]
)
REQUEST_QUEUE_TIME = Histogram(
    "lmqueue_request_queue_time_seconds",
    "Time a job waited before a worker started it (started_at - created_at)",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "lmqueue_e2e_request_latency_seconds",
    "Submission to stored outcome",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)

# --- micro-batches and tokens -----------------------------------------------------------------
BATCH_SIZE = Histogram(
    "lmqueue_batch_size", "Rows per generate call (micro-batch)", ["model"], buckets=_BATCH_BUCKETS
)
BATCH_DURATION = Histogram(
    "lmqueue_batch_duration_seconds",
    "Wall time of one generate call",
    ["model"],
    buckets=_STEP_BUCKETS,
)
PROMPT_TOKENS = Counter("lmqueue_prompt_tokens", "Prompt (prefill) tokens processed", ["model"])
GENERATION_TOKENS = Counter("lmqueue_generation_tokens", "Tokens generated", ["model"])
GENERATION_THROUGHPUT = Gauge(
    "lmqueue_generation_tokens_per_second",
    "Generated tokens per second of the last micro-batch",
    ["model"],
)
# The engine increments these when it reuses a computed prompt prefix (KV cache).
PREFIX_CACHE_QUERIES = Counter(
    "lmqueue_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", ["model"]
)
PREFIX_CACHE_HITS = Counter(
    "lmqueue_prefix_cache_hits", "Prompt tokens served from the prefix cache", ["model"]
)
PREFIX_REUSE_REQUESTS = Counter(
    "lmqueue_prefix_reuse_requests", "Requests that reused another row's prompt prefix", ["model"]
)

# --- workers ----------------------------------------------------------------------------------
MODEL_LOAD_TIME = Gauge("lmqueue_model_load_seconds", "Time to load the served model", ["model"])


def record_microbatch(
    model: str, size: int, prompt_tokens: int, completion_tokens: int, seconds: float
) -> None:
    """One generate call of `size` rows took `seconds`."""
    BATCH_SIZE.labels(model).observe(size)
    BATCH_DURATION.labels(model).observe(seconds)
    PROMPT_TOKENS.labels(model).inc(prompt_tokens)
    GENERATION_TOKENS.labels(model).inc(completion_tokens)
    if seconds > 0:
        GENERATION_THROUGHPUT.labels(model).set(completion_tokens / seconds)


def record_outcome(
    model: str,
    status: str,
    created_at: float | None,
    started_at: float | None,
    finished_at: float,
) -> None:
    """One job's outcome was stored."""
    JOBS_FINISHED.labels(model, status).inc()
    if created_at is not None:
        E2E_LATENCY.labels(model).observe(max(0.0, finished_at - created_at))
        if started_at is not None:
            REQUEST_QUEUE_TIME.labels(model).observe(max(0.0, started_at - created_at))


# --- scrape-time collectors -------------------------------------------------------------------


class QueueCollector(Collector):
    """Queue depth per model, read at scrape time (so every API replica reports the truth).

    `lmqueue_queue_depth{state=waiting}`: messages in the model's Redis lists (all priorities);
    `{state=reserved}`: delivered to a worker and not yet acked. `lmqueue_num_requests_waiting`
    and `_running`: jobs queued / running in the store, the source of truth.
    """

    def __init__(
        self,
        models: Callable[[], Iterable[str]],
        redis_url: Callable[[], str],
        queue_keys: Callable[[str], tuple[str, list[str]]],
        store_counts: Callable[[], dict[tuple[str, str], int]],
    ) -> None:
        self._models, self._redis_url = models, redis_url
        self._queue_keys, self._store_counts = queue_keys, store_counts

    def describe(self) -> list[Metric]:
        return []  # collected lazily: never touch Redis or the database at registration

    def collect(self) -> Iterator[Metric]:
        models = sorted(self._models())
        yield from self._redis_depth(models)
        yield from self._store_depth(models)

    def _redis_depth(self, models: list[str]) -> Iterator[Metric]:
        import redis

        family = GaugeMetricFamily(
            "lmqueue_queue_depth", "Messages in a model's queue", labels=["model", "state"]
        )
        try:
            client = redis.Redis.from_url(self._redis_url(), socket_timeout=2)
            try:
                reserved = _reserved_by_queue(client)
                for model in models:
                    queue, keys = self._queue_keys(model)
                    pipe = client.pipeline(transaction=False)
                    for key in keys:
                        pipe.llen(key)
                    family.add_metric([model, "waiting"], float(sum(pipe.execute())))
                    family.add_metric([model, "reserved"], float(reserved.get(queue, 0)))
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read queue depth from Redis: %s", exc)
            return
        yield family

    def _store_depth(self, models: list[str]) -> Iterator[Metric]:
        try:
            counts = self._store_counts()
        except Exception as exc:  # a scrape must never fail because the database hiccups
            log.warning("metrics: cannot count jobs in the store: %s", exc)
            return
        for status, name in (("queued", "waiting"), ("running", "running")):
            family = GaugeMetricFamily(
                f"lmqueue_num_requests_{name}", f"Jobs {status} in the store", labels=["model"]
            )
            for model in models:
                family.add_metric([model], float(counts.get((model, status), 0)))
            yield family


def _reserved_by_queue(client: Any) -> dict[str, int]:
    """Count kombu's unacked messages (a hash of [payload, exchange, routing_key]) per queue."""
    counts: dict[str, int] = {}
    for raw in client.hvals("unacked"):
        try:
            _payload, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        queue = routing_key or exchange
        counts[queue] = counts.get(queue, 0) + 1
    return counts


class GpuCollector(Collector):
    """GPU memory and utilisation through NVML, when an NVIDIA driver and pynvml are present."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        nv = self._nvml
        used = GaugeMetricFamily("lmqueue_gpu_memory_used_bytes", "GPU memory used", labels=["gpu"])
        total = GaugeMetricFamily(
            "lmqueue_gpu_memory_total_bytes", "GPU memory in total", labels=["gpu"]
        )
        util = GaugeMetricFamily(
            "lmqueue_gpu_utilization_ratio", "GPU busy fraction (NVML sample)", labels=["gpu"]
        )
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                rates = nv.nvmlDeviceGetUtilizationRates(handle)
                used.add_metric([str(i)], float(mem.used))
                total.add_metric([str(i)], float(mem.total))
                util.add_metric([str(i)], rates.gpu / 100.0)
        except Exception as exc:
            log.warning("metrics: NVML query failed: %s", exc)
            return
        yield from (used, total, util)


def gpu_collector() -> GpuCollector | None:
    try:
        import pynvml  # optional: nvidia-ml-py, installed in the GPU worker image

        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: simply no GPU metrics
        return None
    return GpuCollector(pynvml)


_registered: set[str] = set()


def register_once(name: str, collector: Collector) -> None:
    """Register a custom collector in the default registry once per process."""
    if name not in _registered:
        REGISTRY.register(collector)
        _registered.add(name)


def start_worker_metrics(host: str, port: int) -> None:
    """Serve this worker's metrics (and GPU metrics, when there is a GPU) on host:port."""
    gpu = gpu_collector()
    if gpu is not None:
        register_once("gpu", gpu)
    start_http_server(port, addr=host)
    log.info("worker metrics on %s:%d/metrics%s", host, port, " (with GPU)" if gpu else "")


def record_prefix_reuse(model: str, prompt_tokens: int, saved_tokens: int, rows: int) -> None:
    """One engine call: prompt tokens it looked up, and those a shared prefix's KV served."""
    PREFIX_CACHE_QUERIES.labels(model).inc(prompt_tokens)
    if rows:
        PREFIX_CACHE_HITS.labels(model).inc(saved_tokens)
        PREFIX_REUSE_REQUESTS.labels(model).inc(rows)
