"""`lmqueue tune`: the real CLI on the tiny demo model, and the recommendation rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.tune import Point, recommend, slot_counts


def _point(slots: int, tps: float, fits: bool = True, step_ms: float = 10.0) -> Point:
    return Point(slots, tps, step_ms, prefill_us_per_token=20.0, peak_mib=1.0, fits=fits)


def test_recommends_the_largest_count_within_five_percent_that_fits() -> None:
    points = [
        _point(1, 10),
        _point(2, 19),
        _point(4, 30),
        _point(8, 29),
        _point(16, 40, fits=False),
    ]
    pick, budget = recommend(points)
    assert pick is not None and pick.slots == 8  # 29 >= 0.95 * 30; 16 did not fit
    assert budget == 256  # 10 ms step / 20 us per prompt token = 500 -> the power of two below


def test_nothing_fits_recommends_nothing() -> None:
    assert recommend([_point(1, 5, fits=False)]) == (None, 0)


def test_slot_counts_double_up_to_the_maximum() -> None:
    assert slot_counts(6) == [1, 2, 4, 6]
    assert slot_counts(1) == [1]


@pytest.mark.slow
def test_tune_cli_prints_a_table_and_a_recommendation(tiny_model_dir: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "cli",
        "tune",
        str(tiny_model_dir),
        "--max-slots",
        "4",
        "--prompt-len",
        "16",
        "--new-tokens",
        "4",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 4]
    assert all(float(r[1]) > 0 for r in rows), done.stdout
    assert "recommended: LMQUEUE_MAX_BATCH_SIZE=" in done.stdout
