"""A batch's output and error lines, rendered on demand from its job rows (never copied).

Line shape (OpenAI Batch API):
    {"id": "batch_req_<job>", "custom_id": ..., "response": {"status_code", "request_id",
     "body"} | null, "error": {"code", "message"} | null}
A succeeded job goes to the output file (status_code 200, body = the OpenAI response). A failed
one goes to the error file with its HTTP-like status and `{"error": {...}}` body; a line that
never ran (cancelled or expired batch) goes there with `response: null` and an `error` whose
code is `batch_cancelled` or `batch_expired`.

Lines come in job id order, which is input line order (see ingest.line_job_id). The partial
results endpoint serves finished lines as they finish (results_page).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from lmqueue.cache import shown_result
from lmqueue.db import session_scope
from lmqueue.errors import INVALID_REQUEST, SERVER_ERROR, line_error
from lmqueue.tables import Job, JobStatus

OUTPUT_STATUSES = (JobStatus.SUCCEEDED,)
ERROR_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED)
RENDER_CHUNK = 1000

CANCELLED_MESSAGE = {
    "batch_cancelled": "The batch was cancelled before this request ran.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}

_COLUMNS = (Job.id, Job.custom_id, Job.status, Job.result, Job.error, Job.cache_hit)


def output_line(
    job_id: str, custom_id: str | None, status: str, result: Any, error: Any
) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"batch_req_{job_id}", "custom_id": custom_id}
    if status == JobStatus.SUCCEEDED:
        line["response"] = {"status_code": 200, "request_id": job_id, "body": result}
        line["error"] = None
        return line
    err = dict(error or {})
    if status == JobStatus.CANCELLED:
        code = err.get("code")
        code = code if code in CANCELLED_MESSAGE else "batch_cancelled"
        line["response"] = None
        line["error"] = line_error(code, CANCELLED_MESSAGE[code])
        return line
    status_code = int(err.pop("status_code", 500) or 500)
    err.setdefault("type", INVALID_REQUEST if status_code < 500 else SERVER_ERROR)
    line["response"] = {"status_code": status_code, "request_id": job_id, "body": {"error": err}}
    line["error"] = None
    return line


def encode(row: Row[Any] | Sequence[Any]) -> bytes:
    job_id, custom_id, status, result, error, cache_hit = tuple(row)
    line = output_line(job_id, custom_id, status, shown_result(result, cache_hit), error)
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def statuses_for(kind: str) -> tuple[str, ...]:
    return OUTPUT_STATUSES if kind == "output" else ERROR_STATUSES


def render(batch_id: str, kind: str) -> Iterator[bytes]:
    """The output ("output") or error ("error") file of a batch, in chunks of lines. Each
    chunk is read in its own short transaction (keyset on job id), so a long download holds
    no transaction open."""
    statuses = statuses_for(kind)
    after = ""
    while True:
        with session_scope() as session:
            rows = session.execute(
                select(*_COLUMNS)
                .where(Job.batch_id == batch_id, Job.id > after, Job.status.in_(statuses))
                .order_by(Job.id)
                .limit(RENDER_CHUNK)
            ).all()
        if not rows:
            return
        yield b"".join(encode(r) for r in rows)
        after = rows[-1][0]


@dataclass
class ResultsPage:
    lines: list[bytes]
    cursor: str  # pass as `after` for the next page
    complete: bool  # every line of the batch has been returned


# At most this many unfinished lines are skipped and remembered in the cursor; past that a page
# waits for the oldest of them (so the cursor stays a few hundred bytes).
MAX_SKIPPED = 200
LINE_HEX = 8  # the line number at the end of a batch job id (ingest.line_job_id)


def parse_cursor(cursor: str) -> tuple[str, list[str]]:
    """`<last scanned job id>[.<line hex>...]`: the id up to which lines were scanned, and the
    lines at or before it that were unfinished then (not returned yet). A plain job id (the old
    cursor) has none."""
    high, *rest = cursor.split(".")
    if len(high) <= LINE_HEX:
        return high, []
    prefix = high[:-LINE_HEX]
    return high, [prefix + r.zfill(LINE_HEX) for r in rest[:MAX_SKIPPED] if r]


def make_cursor(high: str, skipped: Sequence[str]) -> str:
    return ".".join([high] + [s[-LINE_HEX:].lstrip("0") or "0" for s in skipped])


def results_page(
    session: Session, batch_id: str, after: str, limit: int, ingested: bool
) -> ResultsPage:
    """Finished lines in input order, skipping unfinished ones and coming back to them: first
    the lines the cursor skipped that have finished since, then the lines after it. One stuck
    line holds back nothing (up to MAX_SKIPPED of them); every custom_id comes exactly once
    across pages. `ingested` is False while the batch is still validating (its jobs may not
    exist yet)."""
    high, skipped = parse_cursor(after)
    lines: list[bytes] = []
    still: list[str] = []
    if skipped:
        rows = session.execute(
            select(*_COLUMNS).where(Job.batch_id == batch_id, Job.id.in_(skipped)).order_by(Job.id)
        ).all()
        for row in rows:  # a skipped id that no longer exists (purged) is dropped
            if row[2] in JobStatus.TERMINAL and len(lines) < limit:
                lines.append(encode(row))
            else:
                still.append(row[0])
    room = limit - len(lines)
    if room <= 0:
        return ResultsPage(lines, make_cursor(high, still), False)
    want = room + MAX_SKIPPED - len(still)
    rows = session.execute(
        select(*_COLUMNS)
        .where(Job.batch_id == batch_id, Job.id > high)
        .order_by(Job.id)
        .limit(want + 1)
    ).all()
    scanned = 0
    for row in rows:
        if len(lines) >= limit:
            break
        if row[2] in JobStatus.TERMINAL:
            lines.append(encode(row))
        elif len(still) < MAX_SKIPPED:
            still.append(row[0])
        else:
            break
        high, scanned = row[0], scanned + 1
    complete = ingested and not still and scanned == len(rows)
    return ResultsPage(lines, make_cursor(high, still), complete)
