"""Bearer API keys: who is calling, and whether they may use admin endpoints.

With auth off (only allowed on a loopback bind, see lmqueue.exposure) every caller is the one
local user, owner "".
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import APIError
from lmqueue import keys
from lmqueue.db import session_scope
from lmqueue.settings import get_settings

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code=code, type_="invalid_request_error", headers=_CHALLENGE)


_bearer = HTTPBearer(auto_error=False, description="an API key from `lmqueue keys create`")


def principal_of(credentials: HTTPAuthorizationCredentials | None) -> keys.Principal:
    """Who is calling (reads the store when auth is on: call it from a thread, not the loop)."""
    if not get_settings().auth_enabled:
        return keys.ANONYMOUS
    if credentials is None or not credentials.credentials.strip():
        raise _unauthorized(
            "missing API key: send the header 'Authorization: Bearer <key>'", "missing_api_key"
        )
    with session_scope() as session:
        principal = keys.authenticate(session, credentials.credentials.strip())
    if principal is None:
        raise _unauthorized("invalid or revoked API key", "invalid_api_key")
    return principal


async def get_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> keys.Principal:
    """The dependency. Async, because FastAPI runs every sync dependency in its thread pool:
    with auth off that hop (a thread handoff and a loop wake-up, twice per request with
    get_owner) was most of what it cost; with auth on, only the key lookup goes to a thread."""
    if not get_settings().auth_enabled:
        return keys.ANONYMOUS
    return await run_in_threadpool(principal_of, credentials)


def admin_only(principal: keys.Principal) -> keys.Principal:
    if not principal.admin:
        raise APIError(
            403, "this endpoint needs an admin key", code="forbidden", type_="permission_error"
        )
    return principal


async def require_admin(
    principal: Annotated[keys.Principal, Depends(get_principal)],
) -> keys.Principal:
    return admin_only(principal)
