"""Request-scoped dependencies: the caller's identity and a database session."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.orm import Session

from lmqueue.db import get_sessionmaker


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_owner() -> str:
    """The owner of the objects a request may see. Auth (API keys) replaces this."""
    return ""
