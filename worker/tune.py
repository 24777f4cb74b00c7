"""`lmqueue tune MODEL`: find `max_batch_size` and the prefill budget for this machine.

Every deployment does this by hand: run the model at growing batch sizes until throughput stops
growing or memory runs out. Here the worker's own slot loop (the code that will serve) runs a
fixed synthetic load at slot counts 1, 2, 4, ... and for each prints tokens/s, the mean decode
step time and the peak memory. A count "fits" when no row was preempted or failed for memory
(the slot loop lowers its slot count on out-of-memory, so a shrink means it did not fit).

Recommendation: the largest count within 5% of the best throughput among those that fit (more
slots at equal throughput means less queueing). The prefill budget is the number of prompt
tokens whose prefill costs about one decode step at that count, so a step that admits work at
most doubles the running rows' step time.

    python -m worker.tune MODEL [--max-slots 64] [--prompt-len 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmqueue.registry import ModelSpec, RegistryError, get_model
from lmqueue.settings import get_settings
from worker.engine import Engine
from worker.gen_types import GenRequest
from worker.loading import load_engine

TOLERANCE = 0.05  # within 5% of the best throughput counts as "as good"


@dataclass
class Point:
    slots: int
    tokens_per_s: float
    step_ms: float  # mean decode-only step (no prefill in it)
    prefill_us_per_token: float  # extra time a step spends per prompt token it prefills
    peak_mib: float  # CUDA: max allocated; CPU: the slot KV buffers
    fits: bool  # no preemption, no out-of-memory row


def resolve_spec(model: str, args: argparse.Namespace) -> ModelSpec:
    """A registry name, or a local directory / hub id served with the given options."""
    try:
        spec = get_model(model)
    except (KeyError, RegistryError):
        name = Path(model).name or "model"
        spec = ModelSpec(name=name, path=model)
    updates = {k: v for k in ("device", "dtype", "quantization") if (v := getattr(args, k))}
    return spec.model_copy(update=updates)


def synthetic_requests(engine: Engine, n: int, prompt_len: int, new: int) -> list[GenRequest]:
    """n greedy requests of prompt_len random in-vocabulary tokens each (fixed seed)."""
    rng = random.Random(0)
    vocab = min(engine.n_embeddings, len(engine.tokenizer))
    prompt_len = max(1, min(prompt_len, engine.max_context - new - 1))
    return [
        GenRequest([rng.randrange(vocab) for _ in range(prompt_len)], new, temperature=0.0)
        for _ in range(n)
    ]


def measure(engine: Engine, slots: int, budget: int, reqs: list[GenRequest]) -> Point:
    """Run reqs through a fresh slot loop of `slots` rows until all are done."""
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(engine.device)
    loop = engine.slots(slots, budget)
    for i, req in enumerate(reqs):
        loop.admit(str(i), req)
    tokens, decode_times, prefill_costs, failed = 0, [], [], False
    start = time.perf_counter()
    while not loop.idle():
        t0 = time.perf_counter()
        out = loop.step()
        dt = time.perf_counter() - t0
        for _key, res in out.finished:
            tokens += getattr(res, "completion_tokens", 0)
            failed |= getattr(res, "code", "") == "out_of_memory"
        if out.prefilled:
            prefill_costs.append((dt, out.prefilled))
        elif out.live:
            decode_times.append(dt)
    wall = time.perf_counter() - start
    step = sum(decode_times) / max(1, len(decode_times))
    per_token = [max(0.0, dt - step) / n for dt, n in prefill_costs]
    peak = torch.cuda.max_memory_allocated(engine.device) if cuda else kv_bytes(loop)
    return Point(
        slots=slots,
        tokens_per_s=tokens / wall,
        step_ms=step * 1e3,
        prefill_us_per_token=1e6 * sum(per_token) / max(1, len(per_token)),
        peak_mib=peak / 2**20,
        fits=not failed and loop.slots == slots,
    )


def kv_bytes(loop: object) -> int:
    layers = getattr(getattr(loop, "cache", None), "layers", [])
    return sum(
        t.numel() * t.element_size()
        for layer in layers
        for t in (getattr(layer, "kbuf", None), getattr(layer, "vbuf", None))
        if t is not None
    )


def recommend(points: list[Point]) -> tuple[Point | None, int]:
    """The largest count within TOLERANCE of the best fitting throughput, and its budget."""
    fitting = [p for p in points if p.fits]
    if not fitting:
        return None, 0
    best = max(p.tokens_per_s for p in fitting)
    pick = max(
        (p for p in fitting if p.tokens_per_s >= (1 - TOLERANCE) * best), key=lambda p: p.slots
    )
    if pick.prefill_us_per_token <= 0:
        return pick, 1024
    tokens = pick.step_ms * 1e3 / pick.prefill_us_per_token
    budget = 64
    while budget * 2 <= min(tokens, 8192):
        budget *= 2
    return pick, budget


def slot_counts(max_slots: int) -> list[int]:
    counts, n = [], 1
    while n < max_slots:
        counts.append(n)
        n *= 2
    return [*counts, max_slots]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmqueue tune", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a registry name, a local model directory or a hub id")
    p.add_argument("--max-slots", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests-per-slot", type=int, default=2)
    p.add_argument("--device", help="override the registry (cpu, cuda, cuda:N)")
    p.add_argument("--dtype", help="override the registry (float16, bfloat16, float32)")
    p.add_argument("--quantization", help="override the registry (int8, nf4, ...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = load_engine(resolve_spec(args.model, args))
    if not isinstance(engine, Engine):
        print("tune: embedding models have no decode slots to tune", file=sys.stderr)
        return 2
    counts = slot_counts(max(1, args.max_slots))
    points: list[Point] = []
    print(
        f"tune: {engine.name} on {engine.device}, prompts of {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens each, {args.requests_per_slot} requests per slot"
    )
    print(f"{'slots':>5} {'tok/s':>9} {'step ms':>8} {'prefill us/tok':>14} {'peak MiB':>9}  fits")
    for slots in tqdm(counts, desc="slot counts", unit="count", file=sys.stderr, leave=False):
        reqs = synthetic_requests(
            engine, slots * args.requests_per_slot, args.prompt_len, args.new_tokens
        )
        p = measure(engine, slots, get_settings().prefill_budget, reqs)
        points.append(p)
        tqdm.write(
            f"{p.slots:>5} {p.tokens_per_s:>9.1f} {p.step_ms:>8.1f} "
            f"{p.prefill_us_per_token:>14.1f} {p.peak_mib:>9.1f}  {'yes' if p.fits else 'NO'}"
        )
        if not p.fits:
            break  # larger counts will not fit either
    pick, budget = recommend(points)
    if pick is None:
        print("tune: not even one slot fits in memory", file=sys.stderr)
        return 1
    print(
        f"recommended: LMQUEUE_MAX_BATCH_SIZE={pick.slots} LMQUEUE_PREFILL_BUDGET={budget}"
        f"  (or max_batch_size / prefill_budget in models.toml)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
