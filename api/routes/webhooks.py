"""Webhook endpoints of the caller's API key (OpenAI-style management): create, list, read,
delete, rotate the secret, and the deliveries with every attempt."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.deps import get_owner, get_session
from api.errors import APIError
from api.openapi import errors
from api.pagination import list_page
from lmqueue.settings import get_settings
from lmqueue.tables import WebhookEndpoint
from lmqueue.webhooks import EVENT_TYPES
from lmqueue.webhooks import endpoints as hooks
from lmqueue.webhooks.targets import BadTarget, check_target

router = APIRouter(tags=["webhooks"], responses=errors(400, 401, 404))


class CreateEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2000)
    events: list[str] | None = Field(default=None, description="default: every event type")
    description: str = Field(default="", max_length=500)


def _not_found(endpoint_id: str) -> APIError:
    return APIError(
        404, f"no webhook endpoint {endpoint_id!r}", code="not_found", param="endpoint_id"
    )


def _events(events: list[str] | None) -> list[str]:
    if events is None:
        return list(EVENT_TYPES)
    if not events:
        raise APIError(400, "events: name at least one event type", param="events")
    for i, e in enumerate(events):
        if e not in EVENT_TYPES:
            raise APIError(
                400, f"events[{i}]: {e!r} is not one of {', '.join(EVENT_TYPES)}", param="events"
            )
    return sorted(set(events), key=EVENT_TYPES.index)


@router.post("/v1/webhook_endpoints", responses=errors(409))
async def create_endpoint(
    req: CreateEndpoint, owner: Annotated[str, Depends(get_owner)]
) -> dict[str, Any]:
    events = _events(req.events)
    settings = get_settings()
    try:  # resolves the host name: off the event loop
        await run_in_threadpool(check_target, req.url, settings.webhook_allow_private_targets)
    except BadTarget as exc:
        raise APIError(400, str(exc), param="url", code="invalid_url") from exc
    return await run_in_threadpool(_create, owner, req, events)


def _create(owner: str, req: CreateEndpoint, events: list[str]) -> dict[str, Any]:
    from lmqueue.db import session_scope

    limit = get_settings().webhook_max_endpoints_per_key
    with session_scope() as session:
        if hooks.count_endpoints(session, owner) >= limit:
            raise APIError(
                409, f"at most {limit} webhook endpoints per API key", code="too_many_endpoints"
            )
        ep = hooks.create_endpoint(session, owner, req.url, events, req.description)
        return hooks.endpoint_to_dict(ep, with_secret=True)


@router.get("/v1/webhook_endpoints")
def list_endpoints(
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows, has_more = hooks.list_endpoints(session, owner, after, limit)
    return list_page([hooks.endpoint_to_dict(e) for e in rows], has_more)


def _load(session: Session, owner: str, endpoint_id: str) -> WebhookEndpoint:
    ep = hooks.get_endpoint(session, owner, endpoint_id)
    if ep is None:
        raise _not_found(endpoint_id)
    return ep


@router.get("/v1/webhook_endpoints/{endpoint_id}")
def get_endpoint(
    endpoint_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    return hooks.endpoint_to_dict(_load(session, owner, endpoint_id))


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
def delete_endpoint(
    endpoint_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    hooks.delete_endpoint(session, _load(session, owner, endpoint_id))
    return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expire_previous_in: float = Field(
        default=hooks.ROTATION_GRACE_S,
        ge=0,
        le=hooks.ROTATION_GRACE_MAX_S,
        description="seconds the old secret keeps signing (beside the new one); 0: stop now",
    )


@router.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret")
def rotate_secret(
    endpoint_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    req: RotateSecret | None = None,
) -> dict[str, Any]:
    ep = _load(session, owner, endpoint_id)
    hooks.rotate_secret(ep, (req or RotateSecret()).expire_previous_in)
    return hooks.endpoint_to_dict(ep, with_secret=True)


@router.get("/v1/webhook_endpoints/{endpoint_id}/deliveries")
def list_deliveries(
    endpoint_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    _load(session, owner, endpoint_id)
    data, has_more = hooks.list_deliveries(session, endpoint_id, after, limit)
    return list_page(data, has_more)
