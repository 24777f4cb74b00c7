"""Request-scoped dependencies: the caller's identity and a database session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from api.auth import get_principal
from lmqueue.db import session_scope
from lmqueue.keys import Principal


def get_session() -> Iterator[Session]:
    """A transaction per request. Declare it as `Depends(get_session, scope="function")`: the
    default scope commits only after the response is sent, so a client that reads right after
    a write (cancel, then get) could see the old state."""
    with session_scope() as session:
        yield session


async def get_owner(principal: Annotated[Principal, Depends(get_principal)]) -> str:
    """The owner of the objects a request may see: the caller's API key id ("" with auth off).
    Async: it blocks on nothing, and a sync dependency would cost a thread-pool hop.

    Every query filters on it, so another key's object is simply not found (404)."""
    return principal.key_id
