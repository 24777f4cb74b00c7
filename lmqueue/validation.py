"""Validation of one inference request, shared by single jobs and bulk JSONL lines."""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from lmqueue.errors import describe_validation
from lmqueue.registry import RegistryError, get_model
from lmqueue.schemas import ENDPOINTS, parse_body


class InvalidRequest(ValueError):
    """A request that can never succeed; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def reject_non_finite(value: Any, prefix: str = "body") -> None:
    """NaN and Infinity are not JSON (Python's parser lets them through): name the first one.

    Iterative, so a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequest(f"{path}: must be a finite number, got {v}", path)
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}", item) for k, item in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))


def check_endpoint(endpoint: str) -> str:
    """One of the endpoints lmqueue serves (whatever the model); returns it."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", "endpoint"
        )
    return endpoint


def check_request(
    endpoint: str, body: Any, model: str | None = None, allow_stream: bool = False
) -> tuple[str, dict[str, Any]]:
    """Validate an endpoint + OpenAI body; returns (model name, body as sent).

    The body's own `model` is used when `model` is not given; when both are, they must agree.
    `stream: true` only where something reads the deltas (a single job, a synchronous request);
    a batch line has no reader.
    """
    check_endpoint(endpoint)
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", "body")
    reject_non_finite(body)
    body_model = body.get("model")
    if model and body_model and body_model != model:
        raise InvalidRequest(
            f"body.model {body_model!r} differs from model {model!r}", "body.model"
        )
    name = model or body_model
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model is required", "model")
    try:
        spec = get_model(name)
    except RegistryError as exc:
        raise InvalidRequest(str(exc), "model", code="model_not_found") from exc
    if endpoint not in spec.endpoints():
        raise InvalidRequest(
            f"model {name!r} ({spec.task}) does not serve {endpoint}; it serves "
            + ", ".join(spec.endpoints()),
            "endpoint",
            code="unsupported_endpoint",
        )
    if body.get("stream") is True and not allow_stream:
        raise InvalidRequest(
            "stream: not supported in a batch line; submit a single job to stream", "stream"
        )
    full = {**body, "model": name}
    try:
        parse_body(endpoint, full)
    except ValidationError as exc:
        message, param = describe_validation(exc.errors(), "body")
        raise InvalidRequest(message, param) from exc
    return name, full
