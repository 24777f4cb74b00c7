"""Admin endpoints (admin-scoped keys only): manage API keys over HTTP."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from api.auth import require_admin
from api.deps import get_session
from api.errors import APIError
from api.openapi import errors
from lmqueue import keys

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=errors(400, 401, 403, 404, 413),
)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(default="", max_length=200)
    admin: bool = False

    @field_validator("name")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


@router.get("/keys")
def list_keys(
    session: Annotated[Session, Depends(get_session, scope="function")],
) -> dict[str, Any]:
    return {"object": "list", "data": [keys.key_to_dict(r) for r in keys.list_keys(session)]}


@router.post("/keys", status_code=201)
def create_key(
    req: CreateKey, session: Annotated[Session, Depends(get_session, scope="function")]
) -> JSONResponse:
    row, plaintext = keys.create_key(session, name=req.name, admin=req.admin)
    # The only response that ever carries the secret.
    return JSONResponse({**keys.key_to_dict(row), "key": plaintext}, status_code=201)


@router.delete("/keys/{key_id}")
def revoke_key(
    key_id: str, session: Annotated[Session, Depends(get_session, scope="function")]
) -> dict[str, Any]:
    row = keys.revoke_key(session, key_id)
    if row is None:
        raise APIError(404, f"no API key {key_id!r}", code="not_found", param="key_id")
    return keys.key_to_dict(row)
