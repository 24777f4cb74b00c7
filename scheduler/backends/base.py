"""The interface every worker backend implements: how many workers run, and make it n."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Backend(ABC):
    """Scales the workers of ONE model."""

    acts = True  # False: advisory only, decisions are recorded but nothing is started

    def __init__(self, model: str) -> None:
        self.model = model

    @abstractmethod
    def current(self) -> int:
        """Workers serving the model now (starting ones included, retiring ones not)."""

    @abstractmethod
    def scale_to(self, n: int) -> None:
        """Ask for n workers. Retiring must never kill a worker that holds work."""

    def floor(self) -> int:
        """Workers this backend cannot retire (e.g. started by someone else)."""
        return 0

    def poll(self) -> list[str]:
        """Housekeeping once per tick. Returns worker-record hostnames seen dead, so their jobs
        can be recovered at once rather than after heartbeat silence."""
        return []

    def close(self) -> None:
        """Stop what this backend started (the scheduler is shutting down)."""
        return None
