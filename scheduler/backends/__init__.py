"""Worker backends behind one interface (`Backend`: current() and scale_to(n))."""

from __future__ import annotations

from lmqueue.contract import queue_name
from lmqueue.settings import Settings
from scheduler.backends.base import Backend


def make_backend(model: str, settings: Settings) -> Backend:
    kind = settings.scheduler_backend
    if kind == "local":
        from scheduler.backends.local import LocalBackend

        return LocalBackend(model, settings, queue_name(model, settings))
    if kind == "compose":
        from scheduler.backends.compose import ComposeBackend

        return ComposeBackend(model, settings)
    if kind == "kubernetes":
        from scheduler.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(model, settings)
    from scheduler.backends.none import NoBackend

    return NoBackend(model, settings)


__all__ = ["Backend", "make_backend"]
