"""Console logging a person can read: every process logs at WARNING by default (errors and
problems), plus a few status lines that always show (a process started, the scheduler's periodic
summary). `--verbose` or LMQUEUE_LOG_LEVEL=INFO shows everything; LMQUEUE_LOG_LEVELS sets one
component's level (e.g. "scheduler=INFO,worker=DEBUG").

Components: api, worker, scheduler, flower, cli. Libraries that chatter at INFO (alembic, httpx,
torch, torchao, transformers) stay at WARNING unless their component is at DEBUG.
"""

from __future__ import annotations

import logging
import warnings

from lmqueue.settings import Settings, get_settings

STATUS = "lmqueue.status"  # the logger whose lines always show
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("alembic", "httpx", "httpcore", "urllib3", "torch", "torchao", "transformers", "kombu")
COMPONENTS = ("api", "worker", "scheduler", "flower", "cli")
# Whoever configures the handlers (setup_logging, or Celery in a worker), status lines pass.
logging.getLogger(STATUS).setLevel(logging.INFO)


def component_level(component: str, settings: Settings | None = None) -> int:
    """The level for one component: its entry in log_levels, else log_level."""
    settings = settings or get_settings()
    name = settings.log_level
    for item in settings.log_levels.split(","):
        key, _, value = item.partition("=")
        if key.strip() == component and value.strip():
            name = value.strip()
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.WARNING


def level_name(component: str, settings: Settings | None = None) -> str:
    return logging.getLevelName(component_level(component, settings))


def setup_logging(component: str, verbose: bool = False) -> int:
    """Configure this process's console logging; returns the level chosen."""
    level = component_level(component)
    if verbose:
        level = min(level, logging.INFO)
    logging.basicConfig(format=FORMAT, force=True)
    logging.getLogger().setLevel(level)
    logging.getLogger(STATUS).setLevel(logging.INFO)
    quiet_libraries(level)
    return level


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


# torchao's optional kernels ("Failed to load ...") and torch's pytree notices are warnings about
# the libraries themselves, repeated in every torch process: nothing a user can act on. Filters,
# not levels: torch resets its loggers' levels when it is imported.
_LIBRARY_NOTICES = ("torchao", "torch.utils._pytree")
_filtered: set[str] = set()


def quiet_libraries(level: int) -> None:
    """Libraries at WARNING, their self-notices at ERROR (everything when `level` is DEBUG)."""
    for name in NOISY:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)
    if level <= logging.DEBUG:
        return
    for name in _LIBRARY_NOTICES:
        if name not in _filtered:
            logging.getLogger(name).addFilter(_AtLeast(logging.ERROR))
            _filtered.add(name)
    warnings.filterwarnings("ignore", message=".*superuser privileges.*")  # Celery as root


def status(message: str, *args: object) -> None:
    """A line that always shows: a process started, a periodic summary."""
    logging.getLogger(STATUS).info(message, *args)
