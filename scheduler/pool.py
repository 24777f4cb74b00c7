"""A per-host worker pool: the local backend bounded by the devices this host has.

On one host (a compose service, a bare machine) scaling means starting and retiring worker
processes against the GPUs present. Every GPU is a place for ONE worker, pinned to it with
CUDA_VISIBLE_DEVICES, unless the model asks for several (`workers_per_gpu` in its spec): a GPU
is then shared only among workers of that model. Without GPUs the host has
LMQUEUE_POOL_CPU_WORKERS places. The places are shared by every model of the registry, so
several models compete for one host's GPUs; each model still scales to zero when idle (its
process exits and frees the GPU's memory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from lmqueue.settings import Settings


@dataclass
class Place:
    """Somewhere a worker can run: a GPU (`device`), or the CPU (`device` None)."""

    index: int  # stable per pool: a worker's metrics port is base + index
    device: str | None
    models: list[str] = field(default_factory=list)  # one entry per worker placed here


@dataclass
class Placement:
    place: Place
    model: str

    def env(self, metrics_port_base: int) -> dict[str, str]:
        # An empty CUDA_VISIBLE_DEVICES hides every GPU: a CPU place never grabs one.
        env = {"CUDA_VISIBLE_DEVICES": self.place.device or ""}
        if metrics_port_base:
            env["LMQUEUE_WORKER_METRICS_PORT"] = str(metrics_port_base + self.place.index)
        return env


class Places:
    def __init__(self, devices: list[str | None]) -> None:
        self.places = [Place(i, d) for i, d in enumerate(devices)]

    def take(self, model: str, per_place: int = 1) -> Placement | None:
        """A free place for one worker of `model`: a GPU with nothing on it, or one that holds
        only workers of `model` and fewer than `per_place`. None when the host is full."""
        shared = [
            p
            for p in self.places
            if p.models and set(p.models) == {model} and len(p.models) < per_place
        ]
        free = [p for p in self.places if not p.models]
        for place in shared + free:  # fill a shared GPU before taking an empty one
            place.models.append(model)
            return Placement(place, model)
        return None

    def give_back(self, placement: Placement) -> None:
        placement.place.models.remove(placement.model)

    def __len__(self) -> int:
        return len(self.places)

    @property
    def has_gpus(self) -> bool:
        return any(p.device is not None for p in self.places)

    def describe(self) -> str:
        if self.has_gpus:
            return "GPUs " + ",".join(str(p.device) for p in self.places)
        return f"{len(self.places)} CPU place(s), no GPU"


def host_gpus(spec: str) -> list[str]:
    """GPU ids from LMQUEUE_POOL_GPUS: "auto" (CUDA_VISIBLE_DEVICES if set, else what
    `nvidia-smi` lists, else none), "none", or a list such as "0,1"."""
    spec = spec.strip()
    if spec == "none":
        return []
    if spec != "auto":
        return [g.strip() for g in spec.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer: serve on the CPU rather than crash-loop
    return [line.strip() for line in out.splitlines() if line.strip()]


def host_places(settings: Settings) -> Places:
    gpus = host_gpus(settings.pool_gpus)
    if gpus:
        return Places([*gpus])
    return Places([None] * settings.pool_cpu_workers)
