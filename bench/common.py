"""Shared helpers for the benchmarks: the bench model, mixed-length prompts, a timer."""

from __future__ import annotations

import random
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = Path.home() / ".cache" / "lmqueue-bench"


def bench_model_dir(size: str = "bench") -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(CACHE / size, size=size)  # type: ignore[arg-type]


def mixed_prompts(tokenizer: Any, n: int, lo: int = 10, hi: int = 200, seed: int = 0) -> list[str]:
    """n prompts of lo..hi tokens cut from CPython's own sources (always on disk)."""
    rng = random.Random(seed)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer(text).input_ids
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(tokenizer.decode(ids[start : start + length]))
    return prompts


@contextmanager
def timed() -> Iterator[list[float]]:
    box: list[float] = []
    t0 = time.perf_counter()
    yield box
    box.append(time.perf_counter() - t0)
