"""The OpenAPI document, made to say what the API really does (clients and the fuzz test read it):

- errors are 4xx in OpenAI's shape, never FastAPI's 422 (bad input is a 400 here);
- POST /v1/jobs documents `body` as one of the OpenAI request bodies, and `model` as the models
  this server serves (read from the registry when the document is built).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, TypeAdapter

from lmqueue.registry import RegistryError, get_registry
from lmqueue.schemas import ChatBody, CompletionBody, EmbeddingBody

_DESCRIPTIONS = {
    400: "invalid request; `error.param` names the field",
    401: "missing or invalid API key",
    403: "the key lacks the admin scope",
    404: "no such object (or it belongs to another key)",
    409: "conflict with the object's state or an Idempotency-Key",
    413: "request body or upload too large",
    429: "too many open jobs; retry after `Retry-After` seconds",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: these error statuses, in the error shape."""
    return {c: {"model": ErrorResponse, "description": _DESCRIPTIONS[c]} for c in codes}


def _request_bodies(schema: dict[str, Any]) -> None:
    adapter = TypeAdapter(CompletionBody | ChatBody | EmbeddingBody)
    bodies = adapter.json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(bodies.pop("$defs"))
    submit = components.get("SubmitJob", {}).get("properties", {})
    if "body" in submit:
        submit["body"] = {**bodies, "title": "Body", "description": "the OpenAI request body"}
    try:
        names = sorted(get_registry())
    except RegistryError:
        names = []
    if names and "model" in submit:
        submit["model"] = {
            "anyOf": [{"type": "string", "enum": names}, {"type": "null"}],
            "description": "a served model; or give it as body.model",
        }


def _drop_422(schema: dict[str, Any]) -> None:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _drop_422(schema)
            _request_bodies(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
