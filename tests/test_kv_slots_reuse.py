"""The slot cache reuses its buffers: as `end` walks right the live window moves within them,
a step's joining rows make room once, and a loop that runs again makes no new buffers; outputs
stay those of each request alone. A row whose logits went NaN is scrubbed when it leaves, so
that a moved window never leaves non-finite values behind in masked columns."""

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


TEXTS = ["x", "import os\n", "x = 1\n" * 12, "def f(a):\n    return a\n" * 5, "#" * 80]


class Counts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.made = self.moved_in_place = 0
        real_moved, real_in_place = kv_slots._moved, kv_slots.SlotCache._move_in_place

        def moved(*args: Any) -> torch.Tensor:
            self.made += 1
            return real_moved(*args)

        def in_place(cache: kv_slots.SlotCache, new_end: int) -> bool:
            done = real_in_place(cache, new_end)
            self.moved_in_place += done
            return done

        monkeypatch.setattr(kv_slots, "_moved", moved)
        monkeypatch.setattr(kv_slots.SlotCache, "_move_in_place", in_place)


def run_mid_joins(loop: slot_engine.SlotEngine, reqs: list[GenRequest]) -> dict[str, Outcome]:
    """One new request every two steps, more than the slots, then run to the end."""
    results: dict[str, Outcome] = {}
    for i, req in enumerate(reqs):
        assert loop.admit(str(i), req) is None
        for _ in range(2):
            results.update(loop.step().finished)
    while not loop.idle():
        results.update(loop.step().finished)
    return results


def test_window_moves_within_its_buffers_and_a_second_run_makes_none(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slot_engine, "SlotCache", partial(kv_slots.SlotCache, capacity=8))
    counts = Counts(monkeypatch)
    ids = [engine.prompt_ids("/v1/completions", {"prompt": t}) for t in TEXTS]
    reqs = [GenRequest(p, 20 + 5 * i, temperature=0) for i, p in enumerate(ids * 2)]
    want = {str(i): engine.generate([r])[0] for i, r in enumerate(reqs)}
    loop = engine.slots(slots=3, prefill_budget=4096)
    for run in range(2):
        made_before = counts.made
        got = run_mid_joins(loop, reqs)
        for key, res in want.items():
            assert isinstance(res, GenResult)
            assert isinstance(got[key], GenResult), got[key]
            assert got[key].token_ids == res.token_ids, (run, key)
        if run == 1:  # the buffers the first run made were big enough: none made again
            assert counts.made == made_before
    assert counts.moved_in_place > 0


def test_rows_joining_in_one_step_move_the_window_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five rows of growing length join one live row: one relayout for the longest, not five."""
    relayouts: list[int] = []
    real = kv_slots.SlotCache._relayout

    def counted(cache: kv_slots.SlotCache, window: int, min_end: int = 0) -> None:
        relayouts.append(window)
        real(cache, window, min_end)

    monkeypatch.setattr(kv_slots.SlotCache, "_relayout", counted)
    loop = engine.slots(slots=8, prefill_budget=4096)
    first = engine.prompt_ids("/v1/completions", {"prompt": "x"})
    loop.admit("first", GenRequest(first, 30, temperature=0))
    loop.step()
    relayouts.clear()
    for n in range(5):
        prompt = engine.prompt_ids("/v1/completions", {"prompt": "x = 1\n" * (n + 2)})
        loop.admit(str(n), GenRequest(prompt, 4, temperature=0))
    loop.step()
    assert len(loop.live) == 6
    assert len(relayouts) == 1, relayouts


def test_a_row_with_nan_values_is_scrubbed_when_it_leaves(engine: Engine) -> None:
    cache = kv_slots.SlotCache(engine.model.config, slots=2)
    layers = len(cache.layers)
    heads, dim = 2, 4
    good = [(torch.ones(heads, 5, dim), torch.ones(heads, 5, dim)) for _ in range(layers)]
    bad = [(torch.full((heads, 3, dim), float("nan")),) * 2 for _ in range(layers)]
    cache.join(good)
    cache.join(bad)
    cache.leave(1, scrub=True)
    cache.leave(0)
    for layer in cache.layers:
        assert layer.kbuf is not None and layer.vbuf is not None
        assert torch.isfinite(layer.kbuf).all() and torch.isfinite(layer.vbuf).all()


@pytest.mark.parametrize("d", [-7, -3, -2, 2, 3, 7, 20])
def test_shift_plan_moves_a_window_without_overwriting_it(d: int) -> None:
    cols = torch.arange(40.0)
    want = cols.clone()
    start, end = 10, 20
    want[start + d : end + d] = cols[start:end]
    plan = kv_slots._shift_plan(start, end, d)
    if plan is None:
        assert 4 * abs(d) < end - start
        return
    for lo, hi in plan:
        cols[lo + d : hi + d] = cols[lo:hi]
    assert torch.equal(cols[start + d : end + d], want[start + d : end + d])
