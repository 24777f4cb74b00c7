"""End-to-end throughput: the whole service against the engine alone, on a mixed workload.

    python -m bench.e2e [--requests 256] [--probes 8]

(a) N prompts of 10-200 tokens, max_tokens drawn from 8-128, through the whole service: HTTP
    submit, Redis, a Celery worker's slot loop, result store, poll;
(b) the same requests through the slot loop in this process (same slots, same prefill budget),
    once before (a) and once after (the machine drifts; (a) is compared with their mean);
plus, from the worker's Prometheus metrics, the mean live rows per decode step while the backlog
ran, and the time from submit to first token (p50, p99) of max_tokens=1 probes submitted while
the backlog runs (same priority: they queue behind it, first in, first out).
Prints tokens/s and the ratio a/b. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.common import bench_model_dir, bench_stack, mixed_prompts
from bench.continuous import run_slots, workload
from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.registry import ModelSpec
from lmqueue.settings import Settings
from worker.engine import Engine
from worker.loading import load_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def histogram(metrics_url: str, name: str) -> tuple[float, float]:
    """(sum, count) of one of the worker's histograms."""
    text = httpx.get(metrics_url, timeout=5).text
    got = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for k in got:
            if line.startswith(f"{name}_{k}{{"):
                got[k] += float(line.rsplit(" ", 1)[1])
    return got["sum"], got["count"]


def live_rows(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the worker's live-rows-per-decode-step histogram."""
    return histogram(metrics_url, "lmqueue_batch_size")


def submit_all(stack: Stack, bodies: list[dict[str, Any]], parallel: int = 16) -> list[str]:
    with stack.client() as client, ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda b: stack.submit(client, "bench", **b), bodies))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--probes", type=int, default=8)
    args = ap.parse_args()
    settings = Settings()
    slots, budget = settings.max_batch_size, settings.prefill_budget
    model_dir = bench_model_dir()
    engine = load_engine(ModelSpec(name="bench", path=str(model_dir)))
    assert isinstance(engine, Engine)
    tok = engine.tokenizer
    prompts = mixed_prompts(tok, args.requests)
    reqs = workload(engine, [tok(p).input_ids for p in prompts])
    group = settings.admit_batch
    run_slots(engine, reqs[:4], slots, budget, group)  # warm-up
    results, t_b1, decode_b = run_slots(engine, reqs, slots, budget, group)
    tokens_b = sum(r.completion_tokens for r in results)

    port = free_port()
    env = {"LMQUEUE_WORKER_METRICS_PORT": str(port)}
    bodies = [{"prompt": p, "max_tokens": r.max_tokens} for p, r in zip(prompts, reqs, strict=True)]
    with bench_stack({"bench": str(model_dir)}) as stack:
        stack.start_api()
        # As `lmqueue worker` runs it: 2 x slots task threads, so jobs wait in the worker while
        # the slots run and a freed slot never waits on the broker.
        stack.start_worker("bench", concurrency=settings.effective_concurrency(), env=env)
        metrics = f"http://127.0.0.1:{port}/metrics"
        stack.wait_jobs_done(submit_all(stack, bodies[:2]), timeout_s=600)  # warm-up
        s0, c0 = live_rows(metrics)
        busy0, steps0 = histogram(metrics, "lmqueue_batch_duration_seconds")
        t0 = time.perf_counter()
        ids = submit_all(stack, bodies)
        t_submit = time.perf_counter() - t0
        probes = []
        for i in range(args.probes):  # spread over the first half of the backlog
            time.sleep(t_b1 / 2 / max(1, args.probes))
            probes += submit_all(stack, [{"prompt": prompts[i], "max_tokens": 1}], 1)
        # "Under a backlog": until fewer jobs than slots are left unfinished (the tail that
        # drains the last rows is counted separately).
        wait_until(lambda: stack.count_open(ids) < slots, 3600, "the backlog to drain", 0.25)
        s_mid, c_mid = live_rows(metrics)
        jobs = stack.wait_jobs_done(ids, timeout_s=3600)
        t_a = time.perf_counter() - t0
        s1, c1 = live_rows(metrics)
        busy1, steps1 = histogram(metrics, "lmqueue_batch_duration_seconds")
        done = stack.wait_jobs_done(probes, timeout_s=3600)
    # (b) again, after the service: this machine drifts by 10-20% within minutes, so (a) is
    # compared with the mean of a run before it and one after.
    _, t_b2, _ = run_slots(engine, reqs, slots, budget, group)
    t_b = (t_b1 + t_b2) / 2
    bad = [j.error for j in jobs + done if j.status != "succeeded"]
    assert not bad, bad[:3]
    tokens_a = sum(j.completion_tokens or 0 for j in jobs)
    first = [(j.finished_at or 0) - j.created_at for j in done]
    a, b = tokens_a / t_a, tokens_b / t_b
    print(
        f"requests={args.requests} slots={slots} prefill_budget={budget} "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"(a) service   : {tokens_a} tokens in {t_a:.1f} s = {a:.0f} tok/s "
        f"(the {args.requests} submissions took {t_submit:.1f} s)"
    )
    print(
        f"(b) slot loop : {tokens_b} tokens in {t_b1:.1f} s before (a), {t_b2:.1f} s after: "
        f"mean {b:.0f} tok/s"
    )
    print(f"a/b = {a / b:.2f}   (goal >= 0.95)")
    print(
        f"mean live rows per decode step under the backlog: "
        f"{(s_mid - s0) / max(1, c_mid - c0):.1f} of {slots} (goal >= {0.9 * slots:.1f}); "
        f"over the whole run, the draining tail included: {(s1 - s0) / max(1, c1 - c0):.1f}"
    )
    # Where the service's time goes: steps as long as the engine's alone (then the gap is
    # time between steps), or longer (other processes share the cores).
    steps_b = sum(len(v) for v in decode_b.values())
    step_b = sum(sum(v) for v in decode_b.values()) / max(1, steps_b)
    print(
        f"worker: {steps1 - steps0:.0f} steps, {busy1 - busy0:.1f} s of {t_a:.1f} s inside a "
        f"step, {1000 * (busy1 - busy0) / max(1, steps1 - steps0):.0f} ms a step "
        f"(slot loop alone: {1000 * step_b:.0f} ms a decode-only step)"
    )
    print(
        f"submit -> first token of {len(first)} max_tokens=1 probes: "
        f"p50 {statistics.median(first):.1f} s, p99 {percentile(first, 0.99):.1f} s"
    )


if __name__ == "__main__":
    main()
