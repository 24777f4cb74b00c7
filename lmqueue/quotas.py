"""Per-key quotas on batches and files, and deadline-aware batch admission.

Quotas (a key's own value in `api_keys`, else the settings' default; 0 = no limit):
- queued batch lines: open (queued + running) batch lines, plus the lines of its batches still
  validating, plus the new batch's lines;
- queued batch tokens: the estimated cost (prompt + max_tokens) of those lines; a new file is
  estimated at a quarter of its bytes (its lines' exact cost is known only once ingested);
- file bytes: the uploads the key keeps stored.

A refusal is a `Refusal` (the API turns it into a 429 with Retry-After) naming the quota.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lmqueue.admission import MAX_RETRY_S, drain_rate, retry_after_s
from lmqueue.settings import Settings
from lmqueue.tables import ApiKey, Batch, FileObject, Job, JobStatus, now

CHARS_PER_TOKEN = 4  # a rough, tokenizer-free estimate, good enough for a quota
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FILE_RETRY_S = 3600  # stored bytes only go down when files are deleted or expire


@dataclass(frozen=True)
class Refusal:
    quota: str  # the setting / key field that is reached
    message: str
    retry_after_s: int
    param: str


def line_cost(body: dict[str, Any]) -> int:
    """Estimated tokens of one request: its prompt (or messages, or input) and max_tokens."""
    text = body.get("prompt", body.get("messages", body.get("input", "")))
    chars = len(text) if isinstance(text, str) else len(json.dumps(text, ensure_ascii=False))
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    out = limit if isinstance(limit, int) and body.get("input") is None else 0
    return math.ceil(chars / CHARS_PER_TOKEN) + out


@dataclass(frozen=True)
class KeyLimits:
    weight: float
    queued_lines: int
    queued_tokens: int
    file_bytes: int


def key_limits(session: Session, owner: str, settings: Settings) -> KeyLimits:
    row = session.get(ApiKey, owner) if owner else None

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return KeyLimits(
        weight=pick(row and row.weight, settings.key_default_weight),
        queued_lines=pick(row and row.quota_queued_lines, settings.quota_queued_lines),
        queued_tokens=pick(row and row.quota_queued_tokens, settings.quota_queued_tokens),
        file_bytes=pick(row and row.quota_file_bytes, settings.quota_file_bytes),
    )


def queued_batch_work(session: Session, owner: str) -> tuple[int, int]:
    """(lines, estimated tokens) of a key's open batch lines and not yet ingested batches."""
    open_lines = select(func.count(), func.coalesce(func.sum(Job.cost_tokens), 0)).where(
        Job.owner == owner, Job.batch_id.is_not(None), Job.status.in_(JobStatus.OPEN)
    )
    lines, tokens = (int(x or 0) for x in session.execute(open_lines).one())
    pending_lines, pending_bytes = session.execute(
        select(
            func.coalesce(func.sum(FileObject.line_count), 0),
            func.coalesce(func.sum(FileObject.bytes), 0),
        )
        .join(Batch, Batch.input_file_id == FileObject.id)
        .where(Batch.owner == owner, Batch.status == "validating")
    ).one()
    pending = int(pending_lines or 0), int(pending_bytes or 0)
    return lines + pending[0], tokens + pending[1] // CHARS_PER_TOKEN


def stored_bytes(session: Session, owner: str) -> int:
    stmt = select(func.coalesce(func.sum(FileObject.bytes), 0)).where(
        FileObject.owner == owner,
        FileObject.storage_path.is_not(None),
        FileObject.deleted_at.is_(None),
    )
    return int(session.scalar(stmt) or 0)


def owner_drain_rate(session: Session, owner: str, window_s: float = 60.0) -> float:
    stmt = select(func.count()).where(
        Job.owner == owner, Job.batch_id.is_not(None), Job.finished_at >= now() - window_s
    )
    return int(session.scalar(stmt) or 0) / window_s


def check_batch(session: Session, owner: str, f: FileObject, settings: Settings) -> Refusal | None:
    """None if a batch of file `f` fits the key's queued-lines and queued-tokens quotas."""
    limits = key_limits(session, owner, settings)
    lines, tokens = queued_batch_work(session, owner)
    new_lines, new_tokens = f.line_count or 0, f.bytes // CHARS_PER_TOKEN
    checks = (
        ("quota_queued_lines", "batch lines", lines, new_lines, limits.queued_lines),
        ("quota_queued_tokens", "batch tokens", tokens, new_tokens, limits.queued_tokens),
    )
    for quota, what, queued, adds, limit in checks:
        if limit and queued + adds > limit:
            # Lines drain at the key's measured rate; tokens at that rate x tokens per line.
            rate = owner_drain_rate(session, owner)
            if quota == "quota_queued_tokens":
                rate *= tokens / max(lines, 1)
            wait = retry_after_s(queued + adds - limit, rate)
            message = (
                f"quota {quota} exceeded: this API key has {queued} {what} queued and this "
                f"batch adds {adds}; the quota is {limit}. Retry in about {wait} s"
            )
            return Refusal(quota, message, wait, "input_file_id")
    return None


def check_upload(session: Session, owner: str, size: int, settings: Settings) -> Refusal | None:
    """None if `size` more stored bytes fit the key's file-bytes quota."""
    limit = key_limits(session, owner, settings).file_bytes
    if not limit:
        return None
    stored = stored_bytes(session, owner)
    if stored + size <= limit:
        return None
    message = (
        f"quota quota_file_bytes exceeded: this API key stores {stored} bytes of files and "
        f"this upload adds {size}; the quota is {limit}. Delete files or let them expire"
    )
    return Refusal("quota_file_bytes", message, FILE_RETRY_S, "file")


# --- deadline-aware admission -----------------------------------------------------------------


def first_model(path: Any, max_bytes: int = 1 << 20) -> str | None:
    """The model of a batch file's first line (its lines usually share it), or None."""
    try:
        with open(path, "rb") as fh:
            line = json.loads(fh.readline(max_bytes))
        model = line.get("body", {}).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def format_window(seconds: float) -> str:
    """The shortest "Nm" / "Nh" / "Nd" window at least `seconds` long."""
    for unit, size in (("m", 60), ("h", 3600), ("d", 86400)):
        n = math.ceil(seconds / size)
        if n <= (60 if unit == "m" else 48 if unit == "h" else 10_000):
            return f"{max(1, n)}{unit}"
    return f"{math.ceil(seconds / 86400)}d"


def check_deadline(
    session: Session, model: str, lines: int, window_s: int, settings: Settings
) -> Refusal | None:
    """Refuse a batch that clearly cannot finish in its window: the model's open jobs plus its
    own lines, at the model's measured drain rate, take longer than `batch_deadline_slack` x
    the window. Nothing measured yet (no drain): admit."""
    if not settings.batch_deadline_admission:
        return None
    rate = drain_rate(session, model)
    if rate <= 0:
        return None
    ahead = int(
        session.scalar(
            select(func.count()).where(Job.model == model, Job.status.in_(JobStatus.OPEN))
        )
        or 0
    )
    needed = (ahead + lines) / rate
    if needed <= window_s * settings.batch_deadline_slack:
        return None
    feasible = format_window(needed * settings.batch_deadline_slack)
    message = (
        f"completion_window too short: {lines} lines of model {model!r} behind {ahead} queued "
        f"take about {math.ceil(needed)} s at the measured {rate:.1f} lines/s; the earliest "
        f"feasible completion_window is {feasible!r}"
    )
    wait = min(MAX_RETRY_S, math.ceil(needed))
    return Refusal("completion_window", message, wait, "completion_window")
