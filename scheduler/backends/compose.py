"""Workers as a docker compose service: `docker compose up -d --scale SERVICE=N --no-recreate`.

Compose stops surplus containers with SIGTERM, which is Celery's warm shutdown: in-flight tasks
finish and unstarted messages go back to the queue, provided the service's `stop_grace_period`
is longer than a batch (compose's default of 10 s then SIGKILLs; recovery re-runs those jobs).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

from lmqueue.settings import Settings
from scheduler.backends.base import Backend

Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout


def service_name(template: str, model: str) -> str:
    """Fill "{model}" in the template with a compose-safe form of the model name."""
    return template.replace("{model}", re.sub(r"[^a-z0-9_-]+", "-", model.lower()))


class ComposeBackend(Backend):
    def __init__(self, model: str, settings: Settings, run: Runner = _run) -> None:
        super().__init__(model)
        self.service = service_name(settings.scheduler_compose_service, model)
        self.compose_file = settings.scheduler_compose_file
        self._run = run

    def _base(self) -> list[str]:
        argv = ["docker", "compose"]
        if self.compose_file:
            argv += ["-f", self.compose_file]
        return argv

    def scale_argv(self, n: int) -> list[str]:
        return [
            *self._base(),
            "up",
            "-d",
            "--scale",
            f"{self.service}={n}",
            "--no-recreate",
            self.service,
        ]

    def ps_argv(self) -> list[str]:
        return [*self._base(), "ps", "--quiet", "--status", "running", self.service]

    def current(self) -> int:
        return sum(1 for line in self._run(self.ps_argv()).splitlines() if line.strip())

    def scale_to(self, n: int) -> None:
        self._run(self.scale_argv(n))
