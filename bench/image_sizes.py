"""Installed size of each image's Python dependencies, computed offline (no Docker engine here).

For each image: the closure of its requirement list (scripts/requirements.py, as its Dockerfile
installs it), resolved against this venv's installed distributions (markers evaluated, extras
followed), summing the files each distribution installed. The worker figure is for the CPU
torch of this venv; the CUDA wheel the GPU image installs is several GB larger.

    PYTHONPATH=$PWD python -m bench.image_sizes [LIGHT_VENV]

With LIGHT_VENV (the compose rehearsal's, under ~/.cache/lmqueue-tests), also its real size.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

from scripts.requirements import WORKER_EXTRAS, requirements


def closure(reqs: list[str]) -> dict[str, int]:
    """Distribution name -> installed bytes, for reqs and everything they pull in."""
    sizes: dict[str, int] = {}
    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue
        name = dist.metadata["Name"].lower()
        if name in sizes:
            continue
        sizes[name] = sum(
            p.stat().st_size
            for f in dist.files or []
            if (p := Path(str(dist.locate_file(f)))).is_file()
        )
        for line in dist.requires or []:
            sub = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return sizes


def report(title: str, reqs: list[str]) -> None:
    sizes = closure(reqs)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:6]
    print(f"{title}: {sum(sizes.values()) / 1e6:.0f} MB in {len(sizes)} distributions")
    print("   largest: " + ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in top))


def du_mb(path: Path) -> float:
    files = (f for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return sum(f.stat().st_size for f in files) / 1e6


if __name__ == "__main__":
    report("light image (api, scheduler, flower, migrate)", requirements(light=True))
    report(
        "worker image (pool), CPU torch",
        requirements(light=False, extras=WORKER_EXTRAS) + ["nvidia-ml-py"],
    )
    if len(sys.argv) > 1:
        print(f"rehearsal's light venv on disk: {du_mb(Path(sys.argv[1])):.0f} MB")
