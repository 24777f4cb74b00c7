"""Every error object lmqueue answers or stores, built in one place.

OpenAI's shape everywhere: {"message", "type", "param", "code"}. A job's stored error adds
`status_code`, the HTTP status its batch output line reports (lmqueue.batches.output). Batch
`errors.data` items and batch output-line errors have their own OpenAI shapes, built here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"
TIMEOUT = "timeout"
CANCELLED = "cancelled"


def error_object(
    message: str, type_: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": param, "code": code}


def error_body(
    message: str, type_: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An HTTP error response body: {"error": {...}}."""
    return {"error": error_object(message, type_, param, code)}


# --- errors stored on a job -------------------------------------------------------------------


def job_error(
    code: str, message: str, *, type_: str, status_code: int, param: str | None = None
) -> dict[str, Any]:
    return {**error_object(message, type_, param, code), "status_code": status_code}


def request_error(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The request itself cannot succeed (400)."""
    return job_error(code, message, type_=INVALID_REQUEST, status_code=400, param=param)


def server_error(code: str, message: str) -> dict[str, Any]:
    """The worker failed on a valid request (500)."""
    return job_error(code, message, type_=SERVER_ERROR, status_code=500)


def timeout_error() -> dict[str, Any]:
    return job_error(
        "timeout",
        "the job did not finish before its timeout",
        type_=TIMEOUT,
        status_code=408,
        param="timeout",
    )


def crashed_error(attempts: int) -> dict[str, Any]:
    message = f"the worker running this job died {attempts} times; not retrying"
    return job_error("worker_crashed", message, type_=SERVER_ERROR, status_code=500)


def cancelled_error(code: str = "cancelled", while_running: bool = False) -> dict[str, Any]:
    """A job cancelled by its owner, or with its batch (`batch_cancelled`, `batch_expired`)."""
    when = "while it ran" if while_running else "before it started"
    message = f"cancelled {when}" if code == "cancelled" else code.replace("_", " ")
    return error_object(message, CANCELLED, None, code)


# --- batches ----------------------------------------------------------------------------------


def batch_error(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """One item of a batch's `errors.data` (a problem with its input file)."""
    return {"code": code, "message": message, "param": param, "line": line}


def line_error(code: str, message: str) -> dict[str, Any]:
    """The `error` of a batch output line that never got a response."""
    return {"code": code, "message": message}


# --- validation -------------------------------------------------------------------------------


def describe_validation(errors: Sequence[Any], prefix: str = "") -> tuple[str, str | None]:
    """Pydantic errors as one readable message naming each bad field (at most five), and the
    first field as `param`."""
    parts, first = [], None
    for err in list(errors)[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        msg = err.get("msg", "invalid")
        # A model-level check that blames one field (lmqueue.schemas._Named) names that field.
        named = _named_field(err)
        if named is not None:
            loc, msg = [*loc, named[0]], named[1]
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field (not an OpenAI parameter lmqueue knows); remove it"
        field = ".".join(([prefix] if prefix else []) + loc) or prefix or "body"
        first = first or field
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request", first


def _named_field(err: Any) -> tuple[str, str] | None:
    """(field, reason) when a model-level check blamed one field, else None."""
    exc = (err.get("ctx") or {}).get("error")
    arg = exc.args[0] if isinstance(exc, Exception) and exc.args else None
    field = getattr(arg, "field", None)
    return (field, str(arg)) if isinstance(field, str) else None
