"""The worker's own Prometheus metrics: micro-batches, tokens, latency, prefix reuse, model
load time and GPU memory, served on `LMQUEUE_WORKER_METRICS_PORT` (see lmqueue/metrics.py for
the names shared with the API)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmqueue.metrics import JOBS_FINISHED, register_once

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 14400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# --- requests ---------------------------------------------------------------------------------
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

# --- loop steps and tokens --------------------------------------------------------------------
BATCH_SIZE = Histogram(
    "lmqueue_batch_size",
    "Live rows per decode step of the slot loop",
    ["model"],
    buckets=_BATCH_BUCKETS,
)
BATCH_DURATION = Histogram(
    "lmqueue_batch_duration_seconds",
    "Wall time of one loop step (admission, prefill, decode)",
    ["model"],
    buckets=_STEP_BUCKETS,
)
PROMPT_TOKENS = Counter("lmqueue_prompt_tokens", "Prompt (prefill) tokens processed", ["model"])
GENERATION_TOKENS = Counter("lmqueue_generation_tokens", "Tokens generated", ["model"])
GENERATION_THROUGHPUT = Gauge(
    "lmqueue_generation_tokens_per_second",
    "Generated tokens per second of the last decode step",
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
