"""Creating a batch: its parameters checked (OpenAI's rules), a new batch in `validating`, and
the child batch of a finished one's failed lines (retry_failed)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lmqueue import files as fs
from lmqueue.batches import BatchInputError
from lmqueue.batches.state import RETRYABLE, VALIDATING, advance_batch
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, Job, JobStatus, new_id, now
from lmqueue.validation import InvalidRequest, check_endpoint

_WINDOW = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
RETRY_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED)
RETRY_CHUNK = 1000


# --- parameters -------------------------------------------------------------------------------


def parse_window(text: str, max_s: int) -> int:
    """ "24h", "7d", "30m", "90s" -> seconds. OpenAI only knows "24h"; any duration works here."""
    m = _WINDOW.match(text or "")
    if not m:
        raise BatchInputError(
            f"completion_window must be a duration like '24h', '7d', '30m' or '90s', got {text!r}",
            "completion_window",
        )
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if not 1 <= seconds <= max_s:
        raise BatchInputError(
            f"completion_window must be between 1s and {max_s}s (LMQUEUE_BATCH_MAX_WINDOW_S)",
            "completion_window",
        )
    return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's rules: at most 16 keys, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise BatchInputError("metadata must be an object of string values", "metadata")
    if len(metadata) > MAX_METADATA_KEYS:
        raise BatchInputError(f"metadata has more than {MAX_METADATA_KEYS} keys", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            msg = f"metadata key {key[:20]!r}… is longer than {MAX_METADATA_KEY} characters"
            raise BatchInputError(msg, "metadata")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            msg = f"metadata[{key!r}] must be a string of at most {MAX_METADATA_VALUE} characters"
            raise BatchInputError(msg, f"metadata.{key}")
    return dict(metadata)


def new_batch(
    *,
    owner: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Any,
    parent_batch_id: str | None = None,
    settings: Settings | None = None,
) -> Batch:
    """A validated, not yet ingested batch (status validating). Raises BatchInputError."""
    settings = settings or get_settings()
    window_s = parse_window(completion_window, settings.batch_max_window_s)
    t = now()
    return Batch(
        id=new_id("batch"),
        owner=owner,
        endpoint=_endpoint(endpoint),
        input_file_id=input_file_id,
        completion_window=completion_window.strip(),
        status=VALIDATING,
        parent_batch_id=parent_batch_id,
        metadata_=check_metadata(metadata),
        created_at=t,
        expires_at=t + window_s,
        queue_prefix=settings.queue_prefix,
    )


def _endpoint(endpoint: str) -> str:
    try:
        return check_endpoint(endpoint)
    except InvalidRequest as exc:
        raise BatchInputError(exc.message, exc.param, exc.code) from exc


# --- retry_failed -----------------------------------------------------------------------------


def retry_lines(session: Session, batch: Batch, chunk: int = RETRY_CHUNK) -> Iterator[bytes]:
    """The input lines of a batch's failed and never-run requests, in line order."""
    after = ""
    while True:
        rows = session.execute(
            select(Job.id, Job.custom_id, Job.body)
            .where(Job.batch_id == batch.id, Job.id > after, Job.status.in_(RETRY_STATUSES))
            .order_by(Job.id)
            .limit(chunk)
        ).all()
        if not rows:
            return
        for _job_id, custom_id, body in rows:
            line = {"custom_id": custom_id, "method": "POST", "url": batch.endpoint, "body": body}
            yield json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        after = rows[-1][0]


def retry_batch(session: Session, parent: Batch) -> Batch:
    """A child batch (`parent_batch_id`) of the failed and never-run lines of a finished batch,
    from a new input file holding just those lines. The parent is advanced first (and that
    committed, even if the retry is refused). Raises BatchInputError."""
    advance_batch(session, parent.id)
    session.commit()
    if parent.status not in RETRYABLE:
        msg = f"batch {parent.id} is {parent.status}; retry it once it is completed, expired or "
        raise BatchInputError(msg + "cancelled", code="not_finished", status=409)
    if not parent.failed:
        raise BatchInputError(
            f"batch {parent.id} has no failed lines", code="nothing_to_retry", status=400
        )
    settings = get_settings()
    sink = fs.UploadSink(fs.files_dir(settings), settings.batch_max_file_bytes)
    try:
        for line in retry_lines(session, parent):
            sink.write(line)
        f = fs.store_upload(
            session,
            sink,
            owner=parent.owner,
            filename=f"{parent.id}_retry.jsonl",
            purpose="batch",
        )
    except fs.FileTooLarge as exc:
        raise BatchInputError(str(exc), code="file_too_large", status=413) from exc
    finally:
        sink.discard()
    return new_batch(
        owner=parent.owner,
        input_file_id=f.id,
        endpoint=parent.endpoint,
        completion_window=parent.completion_window,
        metadata=parent.metadata_,
        parent_batch_id=parent.id,
    )
