"""The slot loop on the real tiny model: rows join and leave every step with the same output
as alone, long prompts are prefilled in chunks, cancelled rows free their slot, and running out
of memory preempts rows instead of failing them."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine import Engine, GenRequest, GenResult, RequestError
from worker.gen_types import Outcome
from worker.slot_engine import SlotEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return Engine(model, tok, torch.device("cpu"), max_context=256, name="tiny")


def ids(engine: Engine, text: str) -> list[int]:
    return engine.prompt_ids("/v1/completions", {"prompt": text})


def alone(engine: Engine, req: GenRequest) -> GenResult:
    (res,) = engine.generate([req])
    assert isinstance(res, GenResult), res
    return res


def run(loop: SlotEngine, results: dict[str, Outcome], steps: int = 10_000) -> None:
    for _ in range(steps):
        if loop.idle():
            return
        results.update(loop.step().finished)


TEXTS = ["x", "import os\n", "x = 1\n" * 12, "def f(a):\n    return a\n" * 5, "#" * 80]


def test_rows_joining_mid_run_match_alone(engine: Engine) -> None:
    reqs = [GenRequest(ids(engine, t), 4 + 3 * i, temperature=0) for i, t in enumerate(TEXTS)]
    reqs.append(GenRequest(ids(engine, TEXTS[3]), 9, temperature=0.9, seed=11))
    loop = engine.slots(slots=3, prefill_budget=4096)
    results: dict[str, Outcome] = {}
    live_seen = []
    for i, req in enumerate(reqs):  # one new request every two steps, more than the slots
        assert loop.admit(str(i), req) is None
        for _ in range(2):
            out = loop.step()
            live_seen.append(out.live)
            results.update(out.finished)
    run(loop, results)
    assert max(live_seen) <= 3
    for i, req in enumerate(reqs):
        got, want = results[str(i)], alone(engine, req)
        assert isinstance(got, GenResult), got
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), i


def test_rows_join_in_groups_while_others_decode(engine: Engine) -> None:
    """admit_batch 3: with rows live, a prefill takes at least 3 waiting rows (or all that
    wait), never one per freed slot; outputs stay those of each request alone."""
    reqs = [GenRequest(ids(engine, t), 2 + 2 * i, temperature=0) for i, t in enumerate(TEXTS)]
    reqs += [GenRequest(ids(engine, t), 3 + i, temperature=0) for i, t in enumerate(TEXTS)]
    loop = engine.slots(slots=4, prefill_budget=4096, admit_batch=3)
    assert loop.admit_batch == 3
    for i, req in enumerate(reqs):
        assert loop.admit(str(i), req) is None
    results: dict[str, Outcome] = {}
    joined_while_live = []
    while not loop.idle():
        live_before, waiting_before = len(loop.live), len(loop.waiting)
        out = loop.step()
        joined = waiting_before - len(loop.waiting)
        if live_before and joined:
            joined_while_live.append((joined, waiting_before))
        results.update(out.finished)
    assert joined_while_live, "no row joined a running batch"
    assert all(n >= min(3, waiting) for n, waiting in joined_while_live), joined_while_live
    for i, req in enumerate(reqs):
        got = results[str(i)]
        assert isinstance(got, GenResult), got
        assert got.token_ids == alone(engine, req).token_ids, i


def test_long_prompt_is_prefilled_in_chunks(engine: Engine) -> None:
    long = GenRequest(ids(engine, "def f(a):\n    return a\n" * 8), 6, temperature=0)
    short = GenRequest(ids(engine, "x = 1"), 12, temperature=0)
    loop = engine.slots(slots=4, prefill_budget=16)
    assert len(long.prompt_ids) > 3 * 16
    loop.admit("short", short)
    loop.step()
    loop.admit("long", long)
    prefilled = []
    results: dict[str, Outcome] = {}
    while not loop.idle():
        out = loop.step()
        prefilled.append(out.prefilled)
        results.update(out.finished)
    assert loop.chunked is None
    for key, req in (("long", long), ("short", short)):
        got = results[key]
        assert isinstance(got, GenResult)
        assert got.token_ids == alone(engine, req).token_ids


def test_cancelled_row_leaves_and_its_slot_is_reused(engine: Engine) -> None:
    loop = engine.slots(slots=2, prefill_budget=4096)
    a = GenRequest(ids(engine, "a = 1"), 200, temperature=0)
    b = GenRequest(ids(engine, "b = 2"), 5, temperature=0)
    c = GenRequest(ids(engine, "c = 3"), 5, temperature=0)
    loop.admit("a", a)
    loop.admit("b", b)
    loop.step()
    assert loop.capacity() == 0
    loop.cancel(["a"])
    out = loop.step()
    assert out.dropped == ["a"] and loop.capacity() == 1
    loop.admit("c", c)
    results: dict[str, Outcome] = {}
    run(loop, results)
    assert "a" not in results
    assert isinstance(results["c"], GenResult)
    assert results["c"].token_ids == alone(engine, c).token_ids


def test_stream_events_add_up_to_the_text(engine: Engine) -> None:
    req = GenRequest(ids(engine, "def main():"), 12, temperature=0, stream=True)
    loop = engine.slots(slots=2, prefill_budget=4096)
    loop.admit("s", req)
    text, results = "", {}
    while not loop.idle():
        out = loop.step()
        text += "".join(e.text for e in out.events if e.key == "s")
        results.update(out.finished)
    final = results["s"]
    assert isinstance(final, GenResult) and text == final.text


class AllocatingOOM:
    """Wraps Engine.forward: a decode or prefill of more than `limit` rows really allocates a
    buffer and then fails with OutOfMemoryError while the buffer is alive in its frame, as a
    CUDA kernel would. Records whether that buffer was freed before the next forward ran."""

    def __init__(self, engine: Engine, limit: int):
        self.engine, self.limit = engine, limit
        self.inner = engine.forward
        self.pending: list[weakref.ref[torch.Tensor]] = []
        self.freed_before_retry: list[bool] = []
        self.failures = 0

    def __call__(self, ids: torch.Tensor, *args: Any) -> torch.Tensor:
        self.freed_before_retry += [ref() is None for ref in self.pending]
        self.pending.clear()
        if ids.shape[0] > self.limit:
            scratch = torch.empty(ids.shape[0], 1 << 20)  # 4 MiB a row: really allocated
            self.pending.append(weakref.ref(scratch))
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(ids, *args)


def test_out_of_memory_preempts_newest_rows_and_lowers_slots(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = [GenRequest(ids(engine, f"print({i})"), 16, temperature=0) for i in range(6)]
    wanted = [alone(engine, r).token_ids for r in reqs]
    oom = AllocatingOOM(engine, limit=3)
    monkeypatch.setattr(engine, "forward", oom)
    two = len(reqs[0].prompt_ids) * 2
    loop = engine.slots(slots=6, prefill_budget=two)  # prefill two a step; decode them all
    for i, req in enumerate(reqs):
        loop.admit(str(i), req)
    results: dict[str, Outcome] = {}
    run(loop, results)
    assert oom.failures >= 1 and all(oom.freed_before_retry)
    assert loop.slots <= 3
    for i in range(6):
        got = results[str(i)]
        assert isinstance(got, GenResult), got
        assert got.token_ids == wanted[i]


def test_a_row_that_cannot_run_alone_fails_out_of_memory(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "forward", AllocatingOOM(engine, limit=0))
    loop = engine.slots(slots=2, prefill_budget=4096)
    loop.admit("x", GenRequest(ids(engine, "x"), 3, temperature=0))
    results: dict[str, Outcome] = {}
    run(loop, results)
    err = results["x"]
    assert isinstance(err, RequestError) and err.code == "out_of_memory"
