"""Refuse to expose an unprotected service: checks run before the API or Flower binds.

Bound to a loopback address, anything goes (the local run has no keys). Bound anywhere else, the
API needs auth on and every configured secret must be a real one, not a placeholder from an
example file.
"""

from __future__ import annotations

import ipaddress

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lmqueue.settings import Settings

# Values that example files and tutorials use; a deployment that still has one is unprotected.
PLACEHOLDER_SECRETS = frozenset(
    {"", "change-me", "changeme", "change_me", "password", "secret", "example", "admin"}
)


class ExposureError(RuntimeError):
    """The service would be reachable from other machines without real protection."""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere


def _url_password(url: str) -> str | None:
    try:
        return make_url(url).password if url else None
    except ArgumentError:
        return None


def flower_auth_problems(basic_auth: str) -> list[str]:
    """Problems with a Flower `user:password[,user:password]` value."""
    if not basic_auth.strip():
        return ["Flower basic auth is not set (LMQUEUE_FLOWER_BASIC_AUTH=user:password)"]
    problems = []
    for pair in basic_auth.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user:
            problems.append("Flower basic auth must be user:password")
        elif password.lower() in PLACEHOLDER_SECRETS or len(password) < 8:
            problems.append(
                f"Flower password for {user!r} is a placeholder or shorter than 8 characters"
            )
    return problems


def url_problems(settings: Settings) -> list[str]:
    """Placeholder passwords in the database and broker URLs."""
    problems = []
    for name, url in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url)):
        password = _url_password(url)
        if password is not None and password.lower() in PLACEHOLDER_SECRETS:
            problems.append(f"{name} uses a placeholder password")
    return problems


def api_problems(settings: Settings, host: str | None = None) -> list[str]:
    host = settings.api_host if host is None else host
    if is_loopback(host):
        return []
    problems = url_problems(settings)
    if settings.flower_basic_auth:  # the API may be handed the stack's whole .env: check it too
        problems += flower_auth_problems(settings.flower_basic_auth)
    if not settings.auth_enabled:
        problems.insert(0, f"auth is off (LMQUEUE_AUTH_ENABLED=false) but the API binds {host}")
    return problems


def flower_problems(settings: Settings, host: str | None = None) -> list[str]:
    host = settings.flower_host if host is None else host
    if is_loopback(host):
        return []
    return flower_auth_problems(settings.flower_basic_auth) + url_problems(settings)


def ensure_safe(problems: list[str], service: str) -> None:
    if problems:
        raise ExposureError(
            f"refusing to start {service} on a non-loopback address: " + "; ".join(problems)
        )
