"""Where a phase's CPU went: per process and, for the worker, per thread (from /proc).

On two cores the model's two compute threads (the slot loop and torch's OpenMP helper) meet at
a barrier after every op, so any other runnable thread stalls both: the CPU the rest of the
service uses is what the service's steps lose against the engine alone. This splits it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _ticks(stat_path: Path) -> int:
    """utime + stime of one /proc stat file (0 if the process or thread is gone)."""
    try:
        text = stat_path.read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def thread_ticks(pid: int) -> dict[int, int]:
    root = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t) for t in os.listdir(root)]
    except OSError:
        return {}
    return {tid: _ticks(root / str(tid) / "stat") for tid in tids}


def machine_busy_ticks() -> int:
    """Every CPU's non-idle ticks (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:]]
    return t[0] + t[1] + t[2] + t[5] + t[6] + t[7]


@dataclass
class Snapshot:
    worker: dict[int, int]
    others: dict[str, int]  # process label -> ticks
    machine: int


def snapshot(worker_pid: int, others: dict[str, int]) -> Snapshot:
    """`others`: label -> pid of every other process of interest (API, Redis, this bench)."""
    return Snapshot(
        worker=thread_ticks(worker_pid),
        others={k: _ticks(Path(f"/proc/{pid}/stat")) for k, pid in others.items()},
        machine=machine_busy_ticks(),
    )


def split(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds between two snapshots: the worker's two busiest threads (the model's
    compute), its other threads, each other process, and the rest of the machine."""
    used = sorted((after.worker[t] - before.worker.get(t, 0) for t in after.worker), reverse=True)
    out = {
        "worker compute": sum(used[:2]) * TICK_S,
        "worker other threads": sum(used[2:]) * TICK_S,
    }
    for k, ticks in after.others.items():
        out[k] = (ticks - before.others.get(k, 0)) * TICK_S
    out["rest of machine"] = (after.machine - before.machine) * TICK_S - sum(out.values())
    return out


# Not the service's own overhead: the model's compute, and what runs on the machine anyway.
NOT_SERVICE = ("worker compute", "rest of machine")


def service_share(cpu: dict[str, float], skip: tuple[str, ...] = ()) -> float:
    """CPU seconds of everything but the model's compute and the rest of the machine."""
    return sum(v for k, v in cpu.items() if k not in NOT_SERVICE + skip)


def describe(cpu: dict[str, float], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k not in skip)
