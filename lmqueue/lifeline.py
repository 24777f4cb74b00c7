"""Child processes that die with their parent, whatever ends it (kill -9 included).

Linux's PR_SET_PDEATHSIG asks the kernel to send a child a signal when its parent dies; no
handler in the parent can be skipped, so `lmqueue up` and the scheduler leave no orphans. The
signal is SIGTERM: Celery workers then do their warm shutdown (in-flight jobs finish, unstarted
messages go back). Elsewhere (macOS) it is a no-op and the parent's own handlers stop children.

The kernel ties the death signal to the *thread* that forked: spawn children from a thread
that lives as long as the process (every caller here spawns from its main thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
SCHEDULER_PID_ENV = "LMQUEUE_SCHEDULER_PID"  # set on the workers a scheduler starts


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn: Callable[..., int] = libc.prctl
    return fn


_PRCTL = _prctl()  # looked up in the parent: the child between fork and exec only calls it


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child receive `sig` when this process dies; None
    where the platform has no such thing."""
    if _PRCTL is None:
        return None
    prctl, parent = _PRCTL, os.getpid()

    def _arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: go now
            os.kill(os.getpid(), sig)

    return _arm


def pid_alive(pid: int) -> bool:
    """Is `pid` a running (not zombie) process?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


def environ_of(pid: int) -> dict[str, str]:
    """Another process's environment (Linux /proc, same user); {} when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def orphaned_scheduler_child(pid: int) -> bool:
    """Was process `pid` started by a scheduler that is no longer running (its workers then
    belong to nobody: a new scheduler retires them)?"""
    owner = environ_of(pid).get(SCHEDULER_PID_ENV, "")
    if not owner.isdigit() or int(owner) == os.getpid():
        return False
    # Its parent is no longer that scheduler: it died (the child was re-parented to init).
    return parent_of(pid) not in (None, int(owner))


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
