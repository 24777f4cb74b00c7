"""Batch shaping in the worker: length buckets, prefill groups, shared-prefix KV reuse, KV buffers
(out of memory in the slot loop: tests/test_slot_engine.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.buckets import padding_waste, plan_buckets
from worker.engine import Engine, GenRequest, GenResult, PrefixPolicy

pytestmark = pytest.mark.timeout(120)

NO_REUSE = PrefixPolicy(min_tokens=10**9)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return Engine(model, tok, torch.device("cpu"), max_context=256, name="tiny")


def ids(engine: Engine, text: str) -> list[int]:
    return engine.prompt_ids("/v1/completions", {"prompt": text})


# ---- length buckets -------------------------------------------------------------------------


def test_buckets_respect_every_bound() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = sorted(rng.randint(1, 300) for _ in range(rng.randint(1, 80)))
        max_rows, max_tokens = rng.randint(1, 40), rng.randint(64, 4000)
        max_waste = rng.choice([0.0, 0.1, 0.3, 1.0])
        plan = plan_buckets(lengths, max_rows, max_tokens, max_waste)
        assert [i for r in plan for i in r] == list(range(len(lengths)))  # all rows, in order
        for r in plan:
            group = lengths[r.start : r.stop]
            assert len(group) >= 1
            if len(group) > 1:  # a single row is always allowed (it may exceed the budget)
                assert len(group) <= max_rows and len(group) * max(group) <= max_tokens
                assert padding_waste([group]) <= max_waste + 1e-9
    with pytest.raises(ValueError):
        plan_buckets([3, 2], 8, 100)


def test_buckets_bound_the_padding_of_mixed_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(32)]  # one micro-batch of mixed prompts
    one_call = padding_waste([lengths])
    ordered = sorted(lengths)
    groups = [ordered[r.start : r.stop] for r in plan_buckets(ordered, 32, 16_384, 0.2)]
    assert one_call > 0.35
    assert padding_waste(groups) <= 0.2 and 2 <= len(groups) <= 8
    # Without a waste bound only the row and token budgets cut (the old behaviour).
    assert len(plan_buckets(ordered, 32, 16_384)) == 1
    assert [len(r) for r in plan_buckets(ordered, 32, 60 * 40)] != [32]


# ---- prefill in length groups, one decode batch ---------------------------------------------


def test_split_prefill_is_exact_and_decodes_together(engine: Engine) -> None:
    texts = ["x", "import os\n", "x = 1\n" * 12, "def f(a):\n    return a\n" * 5, "#" * 80]
    budgets = (6, 2, 9, 4, 7)
    reqs = [
        GenRequest(ids(engine, t), m, temperature=0) for t, m in zip(texts, budgets, strict=True)
    ]
    reqs.append(GenRequest(ids(engine, texts[2]), 8, temperature=1.0, seed=4))
    seen: list[tuple[list[list[int]], list[list[int]]]] = []

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append((kwargs["position_ids"].tolist(), kwargs["attention_mask"].tolist()))

    engine.prefix_policy = NO_REUSE  # two prompts are identical: keep them in length groups
    engine.prefill_max_waste = 1.0
    one = engine.generate(reqs)
    engine.prefill_max_waste = 0.1
    handle = engine.model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        split = engine.generate(reqs)
    finally:
        handle.remove()
        engine.prefix_policy = PrefixPolicy()
    for a, b in zip(one, split, strict=True):
        assert isinstance(a, GenResult) and isinstance(b, GenResult)
        assert (a.token_ids, a.finish_reason, a.completion_tokens) == (
            b.token_ids,
            b.finish_reason,
            b.completion_tokens,
        )
    lengths = sorted(len(r.prompt_ids) for r in reqs)
    T = lengths[-1]
    prefills = [s for s in seen if len(s[0][0]) > 1]
    assert len(prefills) >= 3  # short, middle and long prompts apart
    for pos, mask in prefills:  # each group: left-padded only to its own longest prompt
        width = len(pos[0])
        real = [sum(m) for m in mask]
        assert max(real) == width and 1 - sum(real) / (len(real) * width) <= 0.1
    first_decode = seen[len(prefills)]
    assert len(first_decode[0]) == len(reqs)  # all rows in one decode batch
    assert all(len(m) == T + 1 for m in first_decode[1])  # merged cache: longest prompt + 1


# ---- shared-prefix KV reuse -----------------------------------------------------------------


def prefix_batch(engine: Engine) -> list[GenRequest]:
    header = ids(engine, "You are a careful assistant. Answer in one line.\n" * 3)
    assert len(header) >= 40
    rng = random.Random(5)
    tails = ["import os\n", "x", "def f(a, b):\n    return a + b\n", "#" * 30, "class A:\n"]
    reqs = []
    for i, tail in enumerate(tails * 2):
        extra = engine.tokenizer(tail, add_special_tokens=False)["input_ids"]
        reqs.append(GenRequest(header + extra, max_tokens=rng.randint(1, 20), temperature=0))
        if i == 3:  # a sampled row with a seed, and one with a stop string
            reqs.append(GenRequest(header + extra, 12, temperature=0.9, top_p=0.9, seed=11))
            reqs.append(GenRequest(header + extra, 15, temperature=0, stop=["\n"]))
    return reqs


def test_prefix_reuse_is_exact(engine: Engine) -> None:
    reqs = prefix_batch(engine)
    engine.prefix_policy = NO_REUSE
    plain = engine.generate(reqs)
    engine.prefix_policy = PrefixPolicy(min_tokens=16, min_rows=2)
    before = engine.stats.prefix_hits, engine.stats.prefix_tokens_saved
    shared = engine.generate(reqs)
    P = len(ids(engine, "You are a careful assistant. Answer in one line.\n" * 3))
    assert engine.stats.prefix_hits == before[0] + 1
    # The prefix is common to all; the header's last token may merge with a suffix, so at
    # least P - 1 positions per extra row were saved.
    assert engine.stats.prefix_tokens_saved - before[1] >= (len(reqs) - 1) * (P - 1)
    for a, b in zip(plain, shared, strict=True):
        assert isinstance(a, GenResult) and isinstance(b, GenResult)
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert (a.prompt_tokens, a.completion_tokens) == (b.prompt_tokens, b.completion_tokens)


def test_prefix_reuse_positions_and_mask(engine: Engine) -> None:
    header = ids(engine, "# shared header line\n" * 6)
    suffixes = [[7], [8, 9, 10], [11, 12]]
    reqs = [GenRequest(header + s, 2, temperature=0) for s in suffixes]
    seen: list[tuple[list[list[int]], list[list[int]]]] = []

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append((kwargs["position_ids"].tolist(), kwargs["attention_mask"].tolist()))

    engine.prefix_policy = PrefixPolicy(min_tokens=8, min_rows=2)
    handle = engine.model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        engine.generate(reqs)
    finally:
        handle.remove()
    P = len(header)
    assert seen[0] == ([list(range(P))], [[1] * P])  # the prefix alone, batch 1
    pos, mask = seen[1]  # the suffixes: [prefix | padding | suffix], positions continue at P
    assert pos[0][-1:] == [P] and pos[1] == [P, P + 1, P + 2] and pos[2][-2:] == [P, P + 1]
    assert mask == [[1] * P + [0, 0, 1], [1] * P + [1, 1, 1], [1] * P + [0, 1, 1]]
    assert seen[2][0] == [[P + 1], [P + 3], [P + 2]]  # the first decode step


def test_prefix_reuse_policy(engine: Engine) -> None:
    header = ids(engine, "# a header\n" * 8)
    engine.prefix_policy = PrefixPolicy(min_tokens=16, min_rows=3)
    hits = engine.stats.prefix_hits
    engine.generate([GenRequest(header + [5], 2, temperature=0)] * 2)  # too few rows
    engine.generate([GenRequest(header[:10] + [5], 2, temperature=0)] * 3)  # prefix too short
    assert engine.stats.prefix_hits == hits
    engine.generate([GenRequest(header + [5], 2, temperature=0)] * 3)
    # Identical prompts: the shared part stops one token short, so each row has a suffix.
    assert engine.stats.prefix_hits == hits + 1
    engine.prefix_policy = PrefixPolicy()


# ---- preallocated KV buffers ----------------------------------------------------------------


def test_buffered_kv_layer_matches_concatenation() -> None:
    from transformers.cache_utils import DynamicLayer

    from worker.kv_cache import BufferedLayer

    g = torch.Generator().manual_seed(0)
    ours, ref = BufferedLayer(capacity=3), DynamicLayer()
    for n in (2, 1, 4, 1, 1):  # grows past its capacity twice
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        got, want = ours.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == ref.get_seq_length() == 9
    idx = torch.tensor([2, 0])
    ours.batch_select_indices(idx)
    ref.batch_select_indices(idx)
    ours.batch_repeat_interleave(2)
    ref.batch_repeat_interleave(2)
    k = torch.randn(4, 2, 1, 4, generator=g)
    got, want = ours.update(k, k), ref.update(k, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ours.crop(-3)
    ref.crop(-3)
    assert torch.equal(ours.keys, ref.keys) and ours.get_seq_length() == 7
