"""Streaming validation of an OpenAI Batch input file, one line at a time.

Each line must be `{"custom_id", "method": "POST", "url": <the batch endpoint>, "body": {...}}`;
the body is checked with the same `check_request` as a single job. The file is never held in
memory: lines are read with a length cap, and only the custom_ids seen so far are remembered
(to report duplicates with the line that used the id first).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmqueue.errors import batch_error
from lmqueue.validation import InvalidRequest, check_request

MAX_CUSTOM_ID = 512  # the jobs.custom_id column


@dataclass(frozen=True)
class LineError:
    """One problem with the input file, in the shape of OpenAI's batch `errors.data` items."""

    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return batch_error(self.code, self.message, self.param, self.line)


@dataclass(frozen=True)
class ValidLine:
    line_no: int
    custom_id: str
    model: str
    body: dict[str, Any]


def read_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, raw line) for every non-blank line; None when a line is longer
    than `max_line_bytes` (its rest is skipped without being read into memory)."""
    with path.open("rb") as f:
        line_no = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip to the end of this line
                    raw = f.readline(1 << 20)
                yield line_no, None
                continue
            if raw.strip():
                yield line_no, raw


class _LineProblem(Exception):
    def __init__(self, error: LineError):
        super().__init__(error.message)
        self.error = error


def _field(obj: dict[str, Any], name: str, line: int) -> Any:
    if name not in obj:
        raise _LineProblem(
            LineError(line, "missing_required_parameter", f"missing required field {name!r}", name)
        )
    return obj[name]


def _body_param(param: str | None) -> str:
    """check_request names fields of a single-job request; in a line they live under body."""
    if param in (None, "endpoint", "model"):
        return "body.model"  # no model, an unknown one, or one that does not serve the url
    return param if param.startswith("body") else f"body.{param}"


def check_line(raw: bytes, line: int, endpoint: str) -> tuple[str, str, dict[str, Any]]:
    """Validate one line; returns (custom_id, model, body). Raises _LineProblem."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _LineProblem(LineError(line, "invalid_json_line", f"invalid JSON: {exc}")) from exc
    except RecursionError as exc:  # e.g. 100,000 nested brackets: Python's parser gives up
        msg = "invalid JSON: nested too deeply"
        raise _LineProblem(LineError(line, "invalid_json_line", msg)) from exc
    if not isinstance(obj, dict):
        raise _LineProblem(LineError(line, "invalid_json_line", "a line must be a JSON object"))
    custom_id = _field(obj, "custom_id", line)
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        msg = f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters"
        raise _LineProblem(LineError(line, "invalid_value", msg, "custom_id"))
    method = _field(obj, "method", line)
    if method != "POST":
        msg = f"method must be 'POST', got {method!r}"
        raise _LineProblem(LineError(line, "invalid_method", msg, "method"))
    url = _field(obj, "url", line)
    if url != endpoint:
        msg = f"url {url!r} does not match the batch endpoint {endpoint!r}"
        raise _LineProblem(LineError(line, "invalid_url", msg, "url"))
    body = _field(obj, "body", line)
    try:
        model, full = check_request(endpoint, body)
    except InvalidRequest as exc:
        param = _body_param(exc.param)
        raise _LineProblem(LineError(line, exc.code, exc.message, param)) from exc
    except RecursionError as exc:  # parsed, but too deep for the body's checks
        msg = "the body is nested too deeply"
        raise _LineProblem(LineError(line, "invalid_value", msg, "body")) from exc
    return custom_id, model, full


def validate_file(
    path: Path, endpoint: str, *, max_lines: int, max_line_bytes: int
) -> Iterator[ValidLine | LineError]:
    """Every line as a ValidLine or a LineError, in file order. Stops after `max_lines` lines
    with one `too_many_lines` error; reports an empty file as one `empty_file` error."""
    first_line: dict[str, int] = {}
    count = 0
    for line_no, raw in read_lines(path, max_line_bytes):
        count += 1
        if count > max_lines:
            msg = f"the file has more than {max_lines} requests (LMQUEUE_BATCH_MAX_LINES)"
            yield LineError(line_no, "too_many_lines", msg)
            return
        if raw is None:
            msg = f"the line is longer than {max_line_bytes} bytes (LMQUEUE_MAX_REQUEST_BYTES)"
            yield LineError(line_no, "line_too_long", msg)
            continue
        try:
            custom_id, model, body = check_line(raw, line_no, endpoint)
        except _LineProblem as problem:
            yield problem.error
            continue
        seen = first_line.setdefault(custom_id, line_no)
        if seen != line_no:
            msg = f"custom_id {custom_id!r} was already used on line {seen}"
            yield LineError(line_no, "duplicate_custom_id", msg, "custom_id")
            continue
        yield ValidLine(line_no, custom_id, model, body)
    if count == 0:
        yield LineError(None, "empty_file", "the input file has no requests")
