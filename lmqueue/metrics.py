"""Prometheus metrics the API reports, and the names shared with the workers.

Names follow vLLM and TGI (`vllm:prompt_tokens_total`, `vllm:e2e_request_latency_seconds`,
`tgi_batch_current_size`), prefixed `lmqueue_`. Both processes use the default registry: the API
runs as one uvicorn process and a worker is one process with threads, so no multiprocess mode
is needed. The API scrapes queue depth from Redis and the store on demand (QueueCollector); a
worker serves its own registry (worker/metrics.py) on `LMQUEUE_WORKER_METRICS_PORT`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import redis
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmqueue.kombu_redis import reserved_counts, waiting_messages

log = logging.getLogger(__name__)

# --- requests ---------------------------------------------------------------------------------
JOBS_SUBMITTED = Counter(
    "lmqueue_jobs_submitted",
    "Jobs accepted: single submits (source=job) and batch lines (source=batch)",
    ["model", "source"],
)
JOBS_FINISHED = Counter(
    "lmqueue_jobs_finished",
    "Jobs by final state (succeeded, failed, cancelled)",
    ["model", "status"],
)
ADMISSION_REJECTIONS = Counter(
    "lmqueue_admission_rejections", "Submissions refused with 429, by limit hit", ["limit"]
)

CACHE_LOOKUPS = Counter(
    "lmqueue_cache_lookups",
    "Result-cache lookups by kind (exact, semantic) and result (hit, miss)",
    ["model", "kind", "result"],
)
WEBHOOK_ATTEMPTS = Counter(
    "lmqueue_webhook_attempts", "Webhook delivery attempts by result (ok, error)", ["result"]
)


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
        queue_of: Callable[[str], str],
        store_counts: Callable[[], dict[tuple[str, str], int]],
    ) -> None:
        self._models, self._redis_url = models, redis_url
        self._queue_of, self._store_counts = queue_of, store_counts

    def describe(self) -> list[Metric]:
        return []  # collected lazily: never touch Redis or the database at registration

    def collect(self) -> Iterator[Metric]:
        models = sorted(self._models())
        yield from self._redis_depth(models)
        yield from self._store_depth(models)

    def _redis_depth(self, models: list[str]) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "lmqueue_queue_depth", "Messages in a model's queue", labels=["model", "state"]
        )
        try:
            client = redis.Redis.from_url(self._redis_url(), socket_timeout=2)
            try:
                queues = {model: self._queue_of(model) for model in models}
                reserved = reserved_counts(client, queues.values())
                for model, queue in queues.items():
                    waiting = waiting_messages(client, queue)
                    family.add_metric([model, "waiting"], float(waiting))
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


_registered: set[str] = set()


def register_once(name: str, collector: Collector) -> None:
    """Register a custom collector in the default registry once per process."""
    if name not in _registered:
        REGISTRY.register(collector)
        _registered.add(name)
