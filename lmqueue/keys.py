"""API keys: created once (the plaintext is shown only then), stored as a SHA-256 hash.

A key is `lmq_` + 43 url-safe characters (256 random bits), so a fast hash is enough: there is
nothing to brute-force that a slow password hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from lmqueue.tables import ApiKey, new_id, now

KEY_PREFIX = "lmq_"
SCOPE_USER = "user"
SCOPE_ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key id owns the objects it creates ("" when auth is off)."""

    key_id: str
    admin: bool


ANONYMOUS = Principal(key_id="", admin=True)  # auth off: the single local user


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(session: Session, name: str = "", admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key; returns (row, plaintext). The plaintext is never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    scopes = f"{SCOPE_USER} {SCOPE_ADMIN}" if admin else SCOPE_USER
    row = ApiKey(
        id=new_id("key"),
        name=name,
        key_hash=hash_key(plaintext),
        key_prefix=plaintext[:12],
        scopes=scopes,
        created_at=now(),
    )
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate(session: Session, plaintext: str) -> Principal | None:
    """The principal of a live (not revoked) key, or None."""
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    return Principal(key_id=row.id, admin=SCOPE_ADMIN in row.scopes.split())


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    """Revoke a key (idempotent); None when there is no such key."""
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now())
        .execution_options(synchronize_session=False)
    )
    return session.get(ApiKey, key_id, populate_existing=True)


LIMIT_FIELDS = ("weight", "quota_queued_lines", "quota_queued_tokens", "quota_file_bytes")


def set_limits(
    session: Session, key_id: str, values: dict[str, float | int | None]
) -> ApiKey | None:
    """Set a key's fair-share weight and quotas (lmqueue.quotas); None in `values` resets a
    field to the settings' default. Returns the key, or None when there is no such key."""
    unknown = set(values) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown key limits: {sorted(unknown)}")
    row = session.get(ApiKey, key_id)
    if row is None:
        return None
    for name, value in values.items():
        setattr(row, name, value)
    session.flush()
    return row


def key_to_dict(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "api_key",
        "name": row.name,
        "prefix": row.key_prefix,
        "scopes": row.scopes.split(),
        "created_at": int(row.created_at),
        "revoked_at": int(row.revoked_at) if row.revoked_at else None,
        # None: the settings' default (LMQUEUE_KEY_DEFAULT_WEIGHT, LMQUEUE_QUOTA_*).
        **{name: getattr(row, name) for name in LIMIT_FIELDS},
    }
