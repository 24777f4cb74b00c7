"""Result-store tables. The database is the source of truth; Redis messages are only hints.

All tables of the product live here so one Alembic history serves SQLite and Postgres.
Timestamps are float Unix seconds: the OpenAI objects we serve use integer seconds, and floats
compare and sort the same on both backends.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
    """Time-ordered id: 12 hex digits of milliseconds then 12 random hex digits.

    Sorting by id sorts by creation time, which gives cheap, stable cursor pagination.
    """
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
    OPEN = (QUEUED, RUNNING)
    TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


class Job(Base):
    """One inference request and, once done, its result or error (one row: never two results)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_status_model", "status", "model"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
        Index("ix_jobs_batch_id_id", "batch_id", "id"),  # a batch's lines in order (0002)
        Index("ix_jobs_owner_id", "owner", "id"),
        # Admission control: open jobs per key, and each model's drain rate (finished lately).
        Index("ix_jobs_owner_status", "owner", "status"),
        Index("ix_jobs_model_finished_at", "model", "finished_at"),
        # Result cache (0007): lookups by key; followers waiting for the line they copy.
        Index("ix_jobs_cache_key", "cache_key"),
        Index("ix_jobs_cache_of", "cache_of"),
        Index("ix_jobs_owner_finished_at", "owner", "finished_at"),  # webhook event scans
        # Retention: finished jobs by age (0006).
        Index("ix_jobs_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(40), nullable=False)
    body: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, nullable=False)
    priority: Mapped[int] = mapped_column(Integer, default=5, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # Bulk batches: the batch a line belongs to, its custom_id and 1-based input line number.
    batch_id: Mapped[str | None] = mapped_column(String(40))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    line_no: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    enqueued_at: Mapped[float | None] = mapped_column(Float)
    # When a worker last said it holds the job's message on its waiting list, unclaimed
    # (transitions.mark_held): the message is not lost although it is old.
    held_at: Mapped[float | None] = mapped_column(Float)
    # The Celery task (message) that last carried the job: find it in Flower, and back.
    task_id: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # A running job belongs to `worker` until `lease_expires_at`; the worker renews the lease.
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    deadline_at: Mapped[float | None] = mapped_column(Float)
    # Which generate() call served this job, and how many rows it had (proof of micro-batching).
    microbatch_id: Mapped[str | None] = mapped_column(String(40))
    microbatch_size: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # Result cache (lmqueue.cache): a succeeded job with a cache_key is a cache entry; a job
    # answered from the cache says where from in cache_hit; a batch line identical to an
    # earlier one (or to a cached job) waits for it in cache_of and copies its outcome.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    cache_of: Mapped[str | None] = mapped_column(String(40))
    cache_hit: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A batch line's estimated cost (prompt + max_tokens), for the queued-tokens quota (0006).
    cost_tokens: Mapped[int | None] = mapped_column(Integer)


class FileObject(Base):
    """An uploaded (or generated) file, OpenAI Files API shaped. Content lives on disk."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_owner_id", "owner", "id"),
        Index("ix_files_expires_at", "expires_at"),  # retention (0006)
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    filename: Mapped[str] = mapped_column(String(512), nullable=False)
    purpose: Mapped[str] = mapped_column(String(40), nullable=False)
    bytes: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    status: Mapped[str] = mapped_column(String(16), default="processed", nullable=False)
    storage_path: Mapped[str | None] = mapped_column(Text)
    # A generated output/error file is built on demand from the jobs of this batch.
    source_batch_id: Mapped[str | None] = mapped_column(String(40))
    line_count: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    expires_at: Mapped[float | None] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float)


class Batch(Base):
    """A bulk JSONL batch, OpenAI Batch API shaped."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_owner_id", "owner", "id"),
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    endpoint: Mapped[str] = mapped_column(String(40), nullable=False)
    input_file_id: Mapped[str] = mapped_column(String(40), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), default="validating", nullable=False)
    model: Mapped[str | None] = mapped_column(String(200))
    parent_batch_id: Mapped[str | None] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    completed: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    failed: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    in_progress_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    finalizing_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    expired_at: Mapped[float | None] = mapped_column(Float)
    cancelling_at: Mapped[float | None] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float)
    # output_expires_after.seconds: the output and error files expire this long after they are
    # created (None: the retention setting) (0006).
    output_expires_after_s: Mapped[int | None] = mapped_column(Integer)
    # The queue namespace (settings.queue_prefix) of the API that accepted it: the dispatcher
    # sends its lines there only, so stacks that share a store never take each other's lines.
    queue_prefix: Mapped[str | None] = mapped_column(String(100))


class ApiKey(Base):
    """An API key; only its SHA-256 hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="", nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    key_prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    scopes: Mapped[str] = mapped_column(String(200), default="user", nullable=False)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    revoked_at: Mapped[float | None] = mapped_column(Float)
    # Tenancy (0006): fair-share weight and quotas; None means the settings' default.
    weight: Mapped[float | None] = mapped_column(Float)
    quota_queued_lines: Mapped[int | None] = mapped_column(Integer)
    quota_queued_tokens: Mapped[int | None] = mapped_column(Integer)
    quota_file_bytes: Mapped[int | None] = mapped_column(Integer)


class WorkerRecord(Base):
    """A worker process and its heartbeat, so recovery can tell live workers from dead ones."""

    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(200), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    pid: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    heartbeat_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    status: Mapped[str] = mapped_column(String(16), default="up", nullable=False)


class ScalingEvent(Base):
    """One autoscaling decision of the scheduler."""

    __tablename__ = "scaling_events"
    __table_args__ = (Index("ix_scaling_events_queue_at", "queue", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    queue: Mapped[str] = mapped_column(String(200), nullable=False)
    backlog: Mapped[int] = mapped_column(Integer, nullable=False)
    current: Mapped[int] = mapped_column(Integer, nullable=False)
    desired: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str] = mapped_column(String(200), nullable=False)


class WebhookEndpoint(Base):
    """Where an API key's events are POSTed, signed with its secret (Standard Webhooks)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_owner_id", "owner", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    events: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    secret: Mapped[str] = mapped_column(String(100), nullable=False)
    # After a rotation the old secret signs too, until it expires (a receiver being updated).
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[float | None] = mapped_column(Float)
    description: Mapped[str] = mapped_column(String(500), default="", nullable=False)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    # Events of objects finished up to here were turned into deliveries (lmqueue.webhooks).
    scanned_until: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    deleted_at: Mapped[float | None] = mapped_column(Float)


class WebhookDelivery(Base):
    """One event for one endpoint; its id is the `webhook-id` of every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_type", "object_id", name="uq_webhook_event"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_id", "endpoint_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(String(40), nullable=False)
    owner: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    event_type: Mapped[str] = mapped_column(String(40), nullable=False)
    object_id: Mapped[str] = mapped_column(String(40), nullable=False)
    payload: Mapped[str] = mapped_column(Text, nullable=False)  # the exact bytes signed
    status: Mapped[str] = mapped_column(String(16), default="pending", nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    delivered_at: Mapped[float | None] = mapped_column(Float)


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: what the receiver answered, or why it failed."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(40), nullable=False)
    at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0, nullable=False)


class SemanticEntry(Base):
    """A prompt's embedding for the semantic cache; `job_id` holds the answer once it succeeds.
    `scope` hashes tenant, model revision, endpoint and every parameter but the prompt."""

    __tablename__ = "semantic_entries"
    __table_args__ = (Index("ix_semantic_entries_scope_id", "scope", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(64), nullable=False)
    job_id: Mapped[str] = mapped_column(String(40), nullable=False)
    vector: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, default=now, nullable=False)
