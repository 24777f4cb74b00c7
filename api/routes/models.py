"""GET /v1/models in OpenAI's shape, from the registry (no torch needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from api.auth import get_principal
from api.errors import APIError
from api.openapi import errors
from lmqueue.registry import RegistryError, get_model, get_registry

router = APIRouter(
    tags=["models"], dependencies=[Depends(get_principal)], responses=errors(401, 404)
)


def _model_object(name: str) -> dict[str, Any]:
    spec = get_model(name)
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "lmqueue",
        "task": spec.task,
        "endpoints": list(spec.endpoints()),
    }


@router.get("/v1/models")
def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(n) for n in sorted(get_registry())]}


@router.get("/v1/models/{model_id:path}")
def retrieve_model(model_id: str) -> dict[str, Any]:
    try:
        return _model_object(model_id)
    except RegistryError as exc:
        raise APIError(404, str(exc), code="model_not_found", param="model") from exc
