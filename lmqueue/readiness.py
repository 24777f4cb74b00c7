"""Readiness: can this process serve? The store answers and is migrated to head, Redis answers.

Liveness (/healthz) says only that the process runs; readiness (/readyz) is what a load balancer
or `depends_on: condition: service_healthy` should wait for.
"""

from __future__ import annotations

from functools import lru_cache

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from lmqueue.broker import redis_reachable
from lmqueue.migrate import alembic_config


@lru_cache(maxsize=1)
def head_revisions() -> frozenset[str]:
    """The migration heads this code expects (read once from migrations/versions)."""
    return frozenset(ScriptDirectory.from_config(alembic_config("")).get_heads())


def store_problem(engine: Engine) -> str | None:
    """None when the database answers and is at the migration head; else what is wrong."""
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except Exception as exc:
        return f"database unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    expected = head_revisions()
    if current != expected:
        have = ", ".join(sorted(current)) or "none (run `lmqueue migrate`)"
        return f"database migrations not at head: have {have}, need {', '.join(sorted(expected))}"
    return None


def broker_problem(redis_url: str) -> str | None:
    if redis_reachable(redis_url, timeout_s=1.0):
        return None
    return "Redis (broker) does not answer"


def readiness(engine: Engine, redis_url: str) -> dict[str, str | None]:
    """{check: problem or None} for the store (connection + migrations) and the broker."""
    return {"store": store_problem(engine), "broker": broker_problem(redis_url)}
