"""Running out of memory in the slot cache's own allocations (the GPU check's out-of-memory path,
bench/gpu_paths.py `oom`): when the KV buffers grow or are first made, rows are preempted or
wait for fewer slots, and every row still finishes with the tokens it gets alone."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from worker import kv_slots, slot_engine
from worker.engine import Engine, GenRequest, GenResult
from worker.gen_types import Outcome


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return Engine(model, tok, torch.device("cpu"), max_context=256, name="tiny")


class CappedBuffers:
    """A device with room for `cells` (rows x columns) per KV buffer: a bigger buffer is really
    made, then OutOfMemoryError is raised, as CUDA's allocator does past its limit."""

    def __init__(self, cells: int):
        self.cells = cells
        self.failures = 0
        self.real_moved = kv_slots._moved
        self.real_allocate = kv_slots.SlotLayer.allocate

    def check(self, buf: torch.Tensor | None) -> None:
        if buf is not None and buf.shape[0] * buf.shape[2] > self.cells:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

    def moved(self, buf: torch.Tensor, *args: Any) -> torch.Tensor:
        out = self.real_moved(buf, *args)
        self.check(out)
        return out

    def allocate(self, layer: Any, *args: Any) -> None:
        self.real_allocate(layer, *args)
        try:
            self.check(layer.kbuf)
        except torch.OutOfMemoryError:
            layer.kbuf = layer.vbuf = None  # the allocation did not happen
            raise


def run_capped(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, cells: int, reqs: list[GenRequest]
) -> tuple[dict[str, Outcome], CappedBuffers, int]:
    cap = CappedBuffers(cells)
    monkeypatch.setattr(kv_slots, "_moved", cap.moved)
    monkeypatch.setattr(kv_slots.SlotLayer, "allocate", lambda lay, *a: cap.allocate(lay, *a))
    # Small first buffers, so the window outgrows them within a few steps.
    monkeypatch.setattr(slot_engine, "SlotCache", partial(kv_slots.SlotCache, capacity=8))
    loop = engine.slots(slots=len(reqs), prefill_budget=4096)
    for i, req in enumerate(reqs):
        assert loop.admit(str(i), req) is None
    results: dict[str, Outcome] = {}
    for _ in range(10_000):
        if loop.idle():
            break
        results.update(loop.step().finished)
    return results, cap, loop.slots


def requests(engine: Engine, n: int, new: int) -> list[GenRequest]:
    prompts = [engine.prompt_ids("/v1/completions", {"prompt": f"x = {i}"}) for i in range(n)]
    return [GenRequest(p, new, temperature=0) for p in prompts]


def test_kv_buffers_that_cannot_grow_preempt_rows_and_all_finish(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = requests(engine, 6, 24)
    wanted = [engine.generate([r])[0] for r in reqs]
    results, cap, slots = run_capped(engine, monkeypatch, 100, reqs)
    assert cap.failures >= 1 and slots < 6
    for i, want in enumerate(wanted):
        got = results[str(i)]
        assert isinstance(got, GenResult) and isinstance(want, GenResult), got
        assert got.token_ids == want.token_ids


def test_kv_buffers_that_cannot_be_made_make_rows_wait_for_fewer_slots(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = requests(engine, 6, 10)
    wanted = [engine.generate([r])[0] for r in reqs]
    results, cap, slots = run_capped(engine, monkeypatch, 40, reqs)  # 6 slots x 8 columns: no
    assert cap.failures >= 1 and slots < 6
    for i, want in enumerate(wanted):
        got = results[str(i)]
        assert isinstance(got, GenResult) and isinstance(want, GenResult), got
        assert got.token_ids == want.token_ids
