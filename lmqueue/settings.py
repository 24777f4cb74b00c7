"""One Settings object, read from env and `.env`, built lazily and overridable in tests."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LMQUEUE_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Path(".lmqueue")
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("DATABASE_URL", "LMQUEUE_DATABASE_URL"),
        description="SQLAlchemy URL; empty means SQLite at <data_dir>/lmqueue.db",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "LMQUEUE_REDIS_URL"),
    )
    embedded_redis: Literal["auto", "never", "always"] = "auto"

    # --- models ------------------------------------------------------------------------------
    models_file: Path | None = None
    # Shortcut when no models file is given: "name=path_or_hub_id[,name2=...]".
    models: str = ""
    worker_model: str = ""  # the model a worker process serves (set by `lmqueue worker`)

    # --- queue and delivery -----------------------------------------------------------------
    queue_prefix: str = "lmqueue"
    # Namespaces every Redis key of the queue (kombu's global key prefix: queue lists, unacked
    # messages, bindings, events), so two stacks on one Redis never take each other's messages.
    deployment: str = Field(
        default="", description="Redis namespace of this stack; empty = derived from the store"
    )
    # Decode slots of a worker's continuous-batching loop (rows that decode together).
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_tokens: int = Field(default=16_384, ge=64)  # embeddings: tokens per encoder call
    # Prompt tokens a step may prefill (longer prompts are prefilled a chunk per step), so the
    # running rows' step time stays bounded while new rows join.
    prefill_budget: int = Field(default=1024, ge=16)
    # While rows decode, new rows join only when this many slots are free (or all that wait
    # fit): every admission costs a prefill forward whose fixed cost (reading the weights) does
    # not depend on its size, so admitting one row per step pays it at nearly every step.
    # 0 = max_batch_size // 8 (at least 1; bench/RESULTS.md has the figures behind it).
    admit_batch: int = Field(default=0, ge=0)
    worker_concurrency: int = Field(
        default=0, ge=0, description="messages a worker holds at once; 0 = 2 x max_batch_size"
    )
    # Jobs a worker keeps waiting for a slot (unclaimed, still `queued`); a message with more is
    # taken in part and the rest re-sent to the queue for other workers. 0 = 2 x slots.
    worker_hold_jobs: int = Field(default=0, ge=0)
    # How often a worker asks the store which of its running jobs were cancelled.
    cancel_poll_s: float = Field(default=0.25, gt=0)
    # Above the longest allowed job, so a long job's message is never redelivered while it runs.
    visibility_timeout_s: int = 3600
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    max_attempts: int = 3
    default_priority: int = Field(default=5, ge=0, le=9)

    # --- API ---------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"  # where the CLI finds the API
    api_key: str = ""  # the CLI's bearer key
    long_poll_max_s: float = 60.0
    max_request_bytes: int = 1_000_000

    # --- streaming (job and batch events, OpenAI's synchronous endpoints) ----------------------
    stream_maxlen: int = Field(
        default=4200,
        ge=100,
        description="entries kept per job's delta stream in Redis (one per step; above max_tokens)",
    )
    stream_ttl_s: int = Field(
        default=3600, ge=10, description="seconds a job's delta stream outlives its last delta"
    )
    events_poll_s: float = Field(
        default=0.5, gt=0, le=10, description="how often event streams re-read the store"
    )

    # --- flower ------------------------------------------------------------------------------
    flower_port: int = 5555
    task_events: bool = Field(
        default=True,
        description=(
            "a worker's per-task events (received, started, succeeded) for Flower's task list; "
            "false: three fewer publishes a job, and Flower lists workers and queues only"
        ),
    )
    flower_sent_events: bool = Field(
        default=False,
        description=(
            "a task-sent event per message, so Flower lists a request as PENDING before a "
            "worker takes it (about a fifth of the API's CPU per submission)"
        ),
    )

    # --- operations ----------------------------------------------------------------------------
    log_level: str = Field(
        default="WARNING",
        description="console level of every process (INFO: everything; `lmqueue up --verbose`)",
    )
    log_levels: str = Field(
        default="", description="per component, e.g. 'scheduler=INFO,worker=DEBUG' (api, flower)"
    )
    summary_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="the scheduler's summary line (jobs/s, queue, workers), 0 = off",
    )
    auth_enabled: bool = Field(
        default=True,
        description="API keys required; off only for a loopback-bound local run (lmqueue up)",
    )
    flower_basic_auth: str = Field(
        default="",
        validation_alias=AliasChoices("LMQUEUE_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH"),
        description="Flower's basic auth, user:password[,user2:password2]",
    )
    flower_host: str = "127.0.0.1"
    metrics_key: str = Field(
        default="",
        description="bearer token for the API's /metrics; empty = an admin API key (auth on)",
    )
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535, description="a worker's Prometheus port; 0 = off"
    )
    worker_metrics_host: str = "127.0.0.1"
    # Admission limits on open (queued + running) jobs. The old names (MAX_BACKLOG_*) still
    # work: "backlog" now only means the scheduler's measure of waiting work.
    max_open_jobs_per_key: int = Field(
        default=10_000,
        ge=0,
        validation_alias=AliasChoices(
            "LMQUEUE_MAX_OPEN_JOBS_PER_KEY", "LMQUEUE_MAX_BACKLOG_PER_KEY"
        ),
        description="open (queued+running) jobs one API key may have; 0 = no limit",
    )
    max_open_jobs_per_model: int = Field(
        default=100_000,
        ge=0,
        validation_alias=AliasChoices(
            "LMQUEUE_MAX_OPEN_JOBS_PER_MODEL", "LMQUEUE_MAX_BACKLOG_PER_MODEL"
        ),
        description="open (queued+running) jobs per model; 0 = no limit",
    )
    admission_cache_s: float = Field(default=1.0, ge=0, le=60)
    max_job_timeout_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="the largest per-job timeout a request may ask"
    )

    # --- bulk batches (OpenAI Files + Batch API) ---------------------------------------------
    # Input files live under <data_dir>/files; generated output files are built from the jobs.
    batch_max_lines: int = Field(default=50_000, ge=1, description="lines per batch input file")
    batch_max_file_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1, description="one /v1/files upload"
    )
    # Below the interactive default (5), so single jobs jump ahead of bulk lines.
    batch_priority: int = Field(default=2, ge=0, le=9)
    # Job ids per Celery message: one message per line would cap throughput (~1.3 ms each).
    batch_lines_per_message: int = Field(default=32, ge=1, le=1024)
    batch_max_errors: int = Field(default=100, ge=1, description="validation errors reported")
    batch_max_window_s: int = Field(default=30 * 24 * 3600, ge=1)
    # A batch still `validating` after this long lost its API process: the scheduler resumes
    # its ingest (idempotent: line job ids are derived from the batch) or re-sends its lines.
    batch_stale_validation_s: float = Field(default=120.0, gt=0)
    # An upload part (.upload-*.part) untouched this long was left by a killed process: swept.
    upload_part_stale_s: float = Field(default=600.0, gt=0)

    # --- tenants: fair share, quotas, deadlines (lmqueue.batches.dispatch, lmqueue.quotas) ----
    # Batch lines are metered into Redis: per model, at most this many lines are sent and not
    # finished (0 = auto: enough for every live worker's slots and hold, and 2 s of drain).
    batch_dispatch_window: int = Field(default=0, ge=0)
    batch_dispatch_interval_s: float = Field(default=0.2, gt=0)
    batch_dispatch_in_api: bool = Field(
        default=True, description="the API process meters batch lines too (no scheduler needed)"
    )
    key_default_weight: float = Field(default=1.0, gt=0, description="fair-share weight of a key")
    quota_queued_lines: int = Field(
        default=250_000, ge=0, description="queued batch lines per key; 0 = no limit"
    )
    quota_queued_tokens: int = Field(
        default=0, ge=0, description="queued batch tokens (prompt + max_tokens) per key; 0 = none"
    )
    quota_file_bytes: int = Field(
        default=20 * 1024**3, ge=0, description="stored upload bytes per key; 0 = no limit"
    )
    # POST /v1/batches refuses a batch that clearly cannot finish in its completion_window.
    batch_deadline_admission: bool = True
    batch_deadline_slack: float = Field(default=1.5, ge=1.0, description="'clearly': this factor")

    # --- retention (lmqueue.retention; the scheduler purges) ---------------------------------
    retention_files_s: int = Field(default=30 * 86400, ge=60, description="uploaded files")
    retention_outputs_s: int = Field(default=30 * 86400, ge=60, description="batch output files")
    retention_batches_s: int = Field(default=30 * 86400, ge=60, description="finished batches")
    retention_jobs_s: int = Field(default=30 * 86400, ge=60, description="finished single jobs")
    purge_interval_s: float = Field(default=60.0, gt=0)
    purge_chunk: int = Field(default=1000, ge=1, le=100_000, description="rows per transaction")

    # --- scheduler ---------------------------------------------------------------------------
    # Global autoscaling settings, the same for every model (per-model overrides can come later).
    scheduler_backend: Literal["local", "compose", "kubernetes", "none"] = Field(
        default="local", description="how workers are scaled: local | compose | kubernetes | none"
    )
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    scheduler_min_workers: int = Field(default=0, ge=0)
    scheduler_max_workers: int = Field(default=2, ge=0)
    scheduler_target_per_worker: int = Field(
        default=0, ge=0, description="backlog one worker should carry; 0 = worker concurrency"
    )
    scheduler_upscale_delay_s: float = Field(default=3.0, ge=0)
    scheduler_downscale_delay_s: float = Field(default=300.0, ge=0)
    scheduler_metrics_port: int = Field(default=9108, ge=0, description="Prometheus; 0 = off")
    # `lmqueue pool`: the local backend bounded by this host's devices (scheduler/pool.py).
    pool_gpus: str = Field(
        default="auto", description='GPUs the pool places workers on: auto | none | "0,1"'
    )
    pool_cpu_workers: int = Field(default=1, ge=0, description="pool workers on a host with no GPU")
    # Workers forked from a pre-imported template process (worker/template.py): seconds, not
    # the ~7 s of importing torch and transformers in every new worker.
    pool_fork: bool = True
    scheduler_compose_file: str = ""  # docker compose -f FILE ("" = compose's own lookup)
    scheduler_compose_service: str = "worker"  # "{model}" is replaced by the model name
    scheduler_k8s_namespace: str = "default"
    scheduler_k8s_deployment: str = "lmqueue-worker-{model}"
    # Recovery: a queued job whose message is nowhere in Redis for this long is re-sent.
    recovery_grace_s: float = Field(default=30.0, gt=0)
    recovery_scan_interval_s: float = Field(default=10.0, gt=0)
    worker_dead_after_s: float = Field(
        default=0.0, ge=0, description="heartbeat silence that means dead; 0 = 3 x heartbeat_s"
    )

    # --- engine ------------------------------------------------------------------------------
    # The rows a step admits are prefilled in length groups padded at most this much, then join
    # the decode slots; 1.0 = one padded prefill per step.
    prefill_max_waste: float = Field(default=0.1, ge=0.0, le=1.0)
    # A step that admits rows while others decode runs both as one packed forward (the matmuls
    # at once for every token, attention per row: worker/packed.py), for Llama-family models;
    # false: a prefill forward, then a decode forward.
    packed_steps: bool = True
    # Shared-prefix KV reuse: rows admitted together whose prompts share at least this many
    # leading tokens, at least prefix_min_rows of them, compute the prefix once (the latest such
    # prefix is kept for later admissions). 0 turns it off.
    prefix_min_tokens: int = Field(default=32, ge=0)
    prefix_min_rows: int = Field(default=2, ge=2)

    # --- webhooks (lmqueue.webhooks; delivered by the scheduler process) ---------------------
    webhook_allow_private_targets: bool = Field(
        default=False,
        description="allow webhook URLs on loopback, private or link-local addresses",
    )
    webhook_poll_s: float = Field(default=0.25, gt=0, description="how often deliveries run")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="one delivery attempt")
    webhook_backoff_s: float = Field(default=5.0, gt=0, description="first retry delay; doubles")
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_retry_window_s: float = Field(
        default=3 * 24 * 3600, gt=0, description="retries stop this long after the event"
    )
    webhook_max_endpoints_per_key: int = Field(default=10, ge=1)

    # --- result cache (lmqueue.cache) --------------------------------------------------------
    cache_enabled: bool = Field(
        default=True, description="exact result cache for deterministic requests"
    )
    cache_ttl_s: float = Field(default=24 * 3600, gt=0, description="a cached result's lifetime")
    cache_max_entries: int = Field(
        default=100_000, ge=1, description="cached results kept; the oldest leave first"
    )

    @field_validator("models_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v  # `.env.example` writes unset paths as empty strings

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lmqueue.db').resolve()}"

    def deployment_name(self) -> str:
        """The stack's Redis namespace: the setting, or a digest of the store's URL, since every
        process of one stack (API, workers, scheduler) names the same store."""
        if self.deployment:
            return self.deployment
        digest = hashlib.sha256(self.resolved_database_url().encode()).hexdigest()
        return f"s{digest[:10]}"

    def effective_concurrency(self) -> int:
        # Double buffering: while the slots run, as many jobs again wait in the worker, so a
        # freed slot never waits on the broker. Still bounded: no worker hoards the queue.
        return self.worker_concurrency or 2 * self.max_batch_size

    def hold_jobs(self, slots: int) -> int:
        return self.worker_hold_jobs or 2 * slots


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached Settings so the next get_settings() re-reads the environment (tests)."""
    get_settings.cache_clear()
