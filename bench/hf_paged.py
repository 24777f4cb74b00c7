"""The two generation backends on the same prompts: lmqueue's slot loop vs transformers'
continuous batching (`engine = "hf-paged"`), both driven as the worker loop drives them.

    python -m bench.hf_paged [--prompts 64] [--slots 16] [--repeats 2] [--size bench]

Mixed prompts (10-200 tokens) with mixed `max_tokens` (8-64), greedy, on the bench demo model
(~42M parameters, CPU, float32). Each backend gets its own copy of the model; the runs are
interleaved (lmqueue, hf-paged, lmqueue, ...) and the best of --repeats is kept, so a load spike
on a shared machine hits both. Prints figures and a Markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import torch

from bench.common import bench_model_dir, mixed_prompts
from worker.backends.base import Backend
from worker.backends.hf_paged import HFPagedBackend
from worker.engine import Engine, GenRequest, GenResult


def load(model_dir: Any) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return Engine(model, tok, torch.device("cpu"), max_context=512, name="bench")


def drive(backend: Backend, reqs: list[GenRequest]) -> tuple[dict[str, GenResult], float, float]:
    """Keep the backend full, as the worker loop does -> (results, seconds, mean live rows)."""
    pending = list(enumerate(reqs))
    results: dict[str, GenResult] = {}
    live = steps = 0
    t0 = time.perf_counter()
    while pending or not backend.idle():
        while pending and backend.capacity() > 0:
            i, req = pending.pop(0)
            assert backend.admit(str(i), req) is None
        out = backend.step()
        for key, res in out.finished:
            assert isinstance(res, GenResult), res
            results[key] = res
        if out.live:
            live, steps = live + out.live, steps + 1
    return results, time.perf_counter() - t0, live / max(1, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", default="bench", help="demo model size (bench | tiny)")
    args = parser.parse_args()

    model_dir = bench_model_dir(args.size)
    ours, theirs = load(model_dir), load(model_dir)
    rng = random.Random(1)
    texts = mixed_prompts(ours.tokenizer, args.prompts, 10, 200)
    reqs = [
        GenRequest(ours.prompt_ids("/v1/completions", {"prompt": t}), rng.randint(8, 64), 0.0)
        for t in texts
    ]
    backends: dict[str, Backend] = {
        "lmqueue": ours.slots(args.slots, prefill_budget=1024),
        "hf-paged": HFPagedBackend(theirs, args.slots, prefill_budget=1024),
    }
    drive(backends["hf-paged"], reqs[:2])  # start the manager's thread outside the timing
    best: dict[str, tuple[float, float]] = {k: (float("inf"), 0.0) for k in backends}
    outs: dict[str, dict[str, GenResult]] = {}
    for _ in range(args.repeats):
        for name, backend in backends.items():
            outs[name], seconds, live = drive(backend, reqs)
            if seconds < best[name][0]:
                best[name] = (seconds, live)
    tokens = sum(r.completion_tokens for r in outs["lmqueue"].values())
    same = sum(
        outs["lmqueue"][k].token_ids == outs["hf-paged"][k].token_ids for k in outs["lmqueue"]
    )
    base = best["lmqueue"][0]
    print(f"{args.prompts} prompts, {tokens} completion tokens, {args.slots} slots")
    print("| backend | tok/s | time | vs lmqueue | mean live rows per step |")
    print("| --- | --- | --- | --- | --- |")
    for name, (seconds, live) in best.items():
        rate, ratio = tokens / seconds, base / seconds
        print(f"| {name} | {rate:.0f} | {seconds:.1f} s | {ratio:.2f}x | {live:.1f} |")
    print(f"identical greedy outputs: {same}/{len(reqs)}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    backends["hf-paged"].close()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
