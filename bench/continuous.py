"""Continuous batching against what users would run instead, on one mixed workload.

    python -m bench.engine --parts continuous [--prompts 256] [--cb-prompts 64] [--repeats 5]

N prompts of 10-200 tokens, each with a max_tokens drawn from 8, 16, 32, 64, 128, greedy:
(i)   the slot loop (the worker's engine: rows join and leave at every step);
(ii)  the static micro-batch policy the worker had before: micro-batches of `slots` requests in
      arrival order, each run until its longest row ends (Engine.generate);
(iii) transformers' own continuous batching (the ContinuousBatchingManager behind
      `model.generate_batch`, paged attention), each request with its own max_new_tokens;
(iv)  the HF `pipeline("text-generation")` at its best batch size N (one call per max_tokens
      group, the most a pipeline user can do with mixed budgets).
(i) and (ii) run interleaved, --repeats rounds, and their median times are compared.
Also a table of decode-step time against live rows, from (i).
"""

from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from worker.engine import Engine, GenRequest, GenResult
from worker.slot_engine import SlotEngine

BUDGETS = (8, 16, 32, 64, 128)
Row = Callable[..., None]


def workload(engine: Engine, prompts: list[list[int]], seed: int = 0) -> list[GenRequest]:
    rng = random.Random(seed)
    return [GenRequest(p, rng.choice(BUDGETS), temperature=0.0) for p in prompts]


def run_slots(
    engine: Engine,
    reqs: list[GenRequest],
    slots: int,
    budget: int,
    admit_batch: int = 0,
    loop: SlotEngine | None = None,
) -> tuple[list[GenResult], float, dict[int, list[float]], int]:
    """(i): everything waiting at once, admitted as slots free; returns results, wall time,
    the decode-only step times by live rows, and the number of steps. `loop`: an idle slot
    engine to run on (its KV buffers already made, as a worker's are after its first jobs);
    a new one by default."""
    loop = loop or engine.slots(slots, budget, admit_batch)
    steps0 = loop.steps
    for i, req in enumerate(reqs):
        assert loop.admit(str(i), req) is None
    results: dict[int, GenResult] = {}
    steps: dict[int, list[float]] = defaultdict(list)
    t0 = time.perf_counter()
    while not loop.idle():
        s = time.perf_counter()
        out = loop.step()
        if out.live and not out.prefilled:
            steps[out.live].append(time.perf_counter() - s)
        for key, res in out.finished:
            assert isinstance(res, GenResult), res
            results[int(key)] = res
    return (
        [results[i] for i in range(len(reqs))],
        time.perf_counter() - t0,
        steps,
        loop.steps - steps0,
    )


def run_static(engine: Engine, reqs: list[GenRequest], slots: int) -> tuple[list[GenResult], float]:
    """(ii): micro-batches of `slots` in arrival order, each to its end."""
    out: list[GenResult] = []
    t0 = time.perf_counter()
    for start in range(0, len(reqs), slots):
        for res in engine.generate(reqs[start : start + slots]):
            assert isinstance(res, GenResult), res
            out.append(res)
    return out, time.perf_counter() - t0


def run_hf_continuous(engine: Engine, reqs: list[GenRequest]) -> tuple[int, float]:
    """(iii): transformers' manager; returns generated tokens and wall time."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=max(BUDGETS), do_sample=False, eos_token_id=sorted(engine.eos_ids)
    )
    model: Any = engine.model
    t0 = time.perf_counter()
    tokens = 0
    with model.continuous_batching_context_manager(generation_config=cfg, timeout=30) as manager:
        for i, req in enumerate(reqs):
            manager.add_request(req.prompt_ids, request_id=str(i), max_new_tokens=req.max_tokens)
        for _ in reqs:
            res = None
            while res is None:
                res = manager.get_result(timeout=60)
            assert res.error is None, res.error
            tokens += len(res.generated_tokens)
    return tokens, time.perf_counter() - t0


def run_pipeline(
    engine: Engine, reqs: list[GenRequest], batches: list[int], sweep: int
) -> tuple[int, float, int]:
    """(iv): the pipeline, one call per max_tokens group, at its best N (picked on `sweep`
    requests). Returns generated tokens, wall time and N."""
    from transformers import pipeline

    tok = engine.tokenizer
    pipe = pipeline("text-generation", model=engine.model, tokenizer=tok)
    tok.padding_side = "left"  # the pipeline pads with this tokenizer

    def run(rs: list[GenRequest], n: int) -> int:
        made = 0
        for budget in BUDGETS:
            group = [tok.decode(r.prompt_ids) for r in rs if r.max_tokens == budget]
            if not group:
                continue
            outs = pipe(
                group, batch_size=n, max_new_tokens=budget, do_sample=False, return_full_text=False
            )
            made += sum(
                len(tok(o[0]["generated_text"], add_special_tokens=False).input_ids) for o in outs
            )
        return made

    best_n, best_t = batches[0], float("inf")
    for n in batches:
        t0 = time.perf_counter()
        run(reqs[:sweep], n)
        t = time.perf_counter() - t0
        print(f"    pipeline batch_size={n}: {sweep} requests in {t:.1f}s")
        if t < best_t:
            best_n, best_t = n, t
    t0 = time.perf_counter()
    tokens = run(reqs, best_n)
    return tokens, time.perf_counter() - t0, best_n


def compare_i_ii(
    engine: Engine, reqs: list[GenRequest], args: Any
) -> tuple[list[GenResult], float, float, int, dict[int, list[float]], list[float]]:
    """(i) and (ii) interleaved, `args.repeats` rounds: this machine drifts by more than 10%
    between identical runs, so each round's ratio is printed and the median times are kept.
    (i) runs on one slot engine throughout, as a worker keeps one (round 1 makes its KV
    buffers). Returns (i)'s results, the median (i) and (ii) times, how many greedy outputs
    agree in every round, (i)'s decode-step times by live rows and each round's (i)/(ii)."""
    slots, budget, group = args.slots, args.prefill_budget, args.admit_batch
    loop = engine.slots(slots, budget, group)
    run_slots(engine, reqs[:4], slots, budget, group, loop=loop)  # warm-up
    times_i: list[float] = []
    times_ii: list[float] = []
    same = len(reqs)
    steps: dict[int, list[float]] = defaultdict(list)
    for n in range(max(1, args.repeats)):
        ours, t_i, round_steps, _ = run_slots(engine, reqs, slots, budget, group, loop=loop)
        static, t_ii = run_static(engine, reqs, slots)
        agree = sum(a.token_ids == b.token_ids for a, b in zip(ours, static, strict=True))
        same = min(same, agree)
        print(
            f"round {n + 1}: (i) slot loop {t_i:.1f} s  (ii) static {t_ii:.1f} s  "
            f"-> {t_ii / t_i:.2f}x; identical greedy outputs {agree}/{len(reqs)}",
            flush=True,
        )
        times_i.append(t_i)
        times_ii.append(t_ii)
        for live, ts in round_steps.items():
            steps[live] += ts
    ratios = [b / a for a, b in zip(times_i, times_ii, strict=True)]
    return ours, statistics.median(times_i), statistics.median(times_ii), same, steps, ratios


def step_table(steps: dict[int, list[float]], row: Row) -> None:
    """Mean decode-step time by live rows, in power-of-two bands."""
    bands: dict[tuple[int, int], list[float]] = defaultdict(list)
    for live, times in steps.items():
        lo = 1 << (live.bit_length() - 1)
        bands[(lo, 2 * lo - 1)] += times
    for (lo, hi), times in sorted(bands.items()):
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        row(
            f"decode step, {label} live rows",
            f"{1e3 * sum(times) / len(times):.0f} ms",
            f"{len(times)} steps",
        )


def part_continuous(engine: Engine, prompts: list[list[int]], args: Any, row: Row) -> None:
    slots, budget, group = args.slots, args.prefill_budget, args.admit_batch
    reqs = workload(engine, prompts)
    ours, t_i, t_ii, same, steps, ratios = compare_i_ii(engine, reqs, args)
    n_tokens = sum(r.completion_tokens for r in ours)
    rate_i, rate_ii = n_tokens / t_i, n_tokens / t_ii
    rounds = f"median of {args.repeats} rounds" if args.repeats > 1 else "one round"
    row(
        f"(i) slot loop, {slots} slots, {len(reqs)} requests",
        f"{rate_i:.0f} tok/s",
        f"{t_i:.1f} s ({rounds}), {n_tokens} tokens",
    )
    row(
        f"(ii) static micro-batches of {slots}",
        f"{rate_ii:.0f} tok/s",
        f"{t_ii:.1f} s; **(i)/(ii) {rate_i / rate_ii:.2f}x** (per round "
        f"{', '.join(f'{r:.2f}' for r in ratios)}: median {statistics.median(ratios):.2f}x), "
        f"identical outputs {same}/{len(reqs)}",
    )

    sub = reqs[: args.cb_prompts]
    tok_iii, t_iii = run_hf_continuous(engine, sub)
    _, t_sub, _, _ = run_slots(engine, sub, slots, budget, group)
    tok_sub = sum(r.completion_tokens for r in ours[: len(sub)])
    rate_iii, rate_sub = tok_iii / t_iii, tok_sub / t_sub
    print(
        f"(iii) transformers CB {rate_iii:.0f} tok/s vs (i) {rate_sub:.0f} on the same "
        f"{len(sub)} -> {rate_sub / rate_iii:.2f}x"
    )
    row(
        f"(iii) transformers continuous batching ({len(sub)} requests)",
        f"{rate_iii:.0f} tok/s",
        f"(i) on the same requests {rate_sub:.0f} tok/s: **(i)/(iii) {rate_sub / rate_iii:.2f}x**",
    )

    tok_iv, t_iv, n = run_pipeline(engine, reqs, args.pipeline_batches, args.sweep)
    rate_iv = tok_iv / t_iv
    print(f"(iv) pipeline N={n} {rate_iv:.0f} tok/s -> (i)/(iv) {rate_i / rate_iv:.2f}x")
    row(
        f"(iv) HF pipeline, best batch_size={n}, per max_tokens group",
        f"{rate_iv:.0f} tok/s",
        f"{t_iv:.1f} s; **(i)/(iv) {rate_i / rate_iv:.2f}x**",
    )
    step_table(steps, row)
