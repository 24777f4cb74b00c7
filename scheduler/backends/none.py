"""No scaling: the scheduler only records decisions and recovers jobs (workers run elsewhere)."""

from __future__ import annotations

from lmqueue.db import session_scope
from lmqueue.fleet import live_workers
from lmqueue.settings import Settings
from scheduler.backends.base import Backend


class NoBackend(Backend):
    acts = False

    def __init__(self, model: str, settings: Settings) -> None:
        super().__init__(model)
        self.settings = settings

    def current(self) -> int:
        with session_scope() as session:
            return len(live_workers(session, self.settings, self.model))

    def floor(self) -> int:
        return self.current()

    def scale_to(self, n: int) -> None:
        """Nothing to do: someone else runs the workers."""
