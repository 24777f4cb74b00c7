"""Streaming costs: what publishing deltas does to the worker loop, and how soon a streaming
client sees its first delta when the queue is full.

    python -m bench.stream [--parts loop,latency] [--model bench|tiny] [--jobs 64]
        [--new-tokens 64] [--rounds 3] [--backlog 256] [--probes 40]

loop:    the real WorkerLoop (slots, claims and result writes on a SQLite store) runs --jobs
         jobs with 0% and with 100% of rows streaming (every step's deltas XADDed to Redis in
         one pipeline); rounds alternate so machine load hits both alike. Prints tokens/s and
         the ratio.
latency: a real stack (API, Redis, one Celery worker on the tiny model); --backlog jobs are
         queued, then --probes streaming jobs at priority 9 are submitted one after another,
         each followed at once by GET /v1/jobs/{id}/events: submit -> first `delta` p50/p99,
         against the same probes on an empty queue.
Prints figures only; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.common import bench_model_dir, bench_stack, mixed_prompts

COMPLETIONS = "/v1/completions"


# ---- the loop: 0% vs 100% streaming ---------------------------------------------------------


class _Timed:
    """The publisher, with the time it takes counted (it runs inside the loop thread)."""

    def __init__(self, hook: Any):
        self.hook, self.seconds, self.calls = hook, 0.0, 0

    def __call__(self, events: Any) -> None:
        t0 = time.perf_counter()
        self.hook(events)
        self.seconds += time.perf_counter() - t0
        self.calls += 1


HOOK_SHARE: list[float] = []  # publish time / step time, per streaming round
STEP_MS: dict[bool, list[float]] = {False: [], True: []}  # mean step time per round


def _loop_round(backend: Any, prompts: list[str], new_tokens: int, stream: bool) -> float:
    """tokens/s of one WorkerLoop run over all prompts."""
    from lmqueue import jobs as q
    from lmqueue.db import session_scope
    from lmqueue.settings import get_settings
    from lmqueue.tables import Job
    from worker.loop import Waiting, WorkerLoop
    from worker.publisher import StreamPublisher

    publisher = _Timed(StreamPublisher.from_settings(get_settings())) if stream else None
    loop = WorkerLoop(
        backend, "bench", "bench-worker", 600.0, hold=len(prompts), on_token=publisher
    )
    items = []
    with session_scope() as session:
        for p in prompts:
            body = {"model": "bench", "prompt": p, "max_tokens": new_tokens, "temperature": 0}
            if stream:
                body["stream"] = True
            job, _ = q.create_job(
                session, owner="", model="bench", endpoint=COMPLETIONS, body=body, priority=5
            )
            items.append(Waiting(job.id, COMPLETIONS, backend.prepare(COMPLETIONS, body)))
    loop.start()
    t0 = time.perf_counter()
    loop.offer(items)
    for w in items:
        w.done.result(timeout=600)
    seconds = time.perf_counter() - t0
    loop.stop()
    if publisher is not None:
        HOOK_SHARE.append(publisher.seconds / loop.stats.seconds)
    STEP_MS[stream].append(1e3 * loop.stats.seconds / max(1, loop.stats.steps))
    if os.environ.get("BENCH_VERBOSE"):
        print(
            f"    steps {loop.stats.steps}, step time {loop.stats.seconds:.2f}s of {seconds:.2f}s"
        )
    with session_scope() as session:
        jobs = [session.get(Job, w.job_id) for w in items]
        tokens = sum((j.completion_tokens or 0) for j in jobs if j is not None)
        assert all(j is not None and j.status == "succeeded" for j in jobs)
    return tokens / seconds


def part_loop(args: argparse.Namespace) -> None:
    from lmqueue.migrate import upgrade_head
    from lmqueue.registry import ModelSpec
    from lmqueue.settings import get_settings, reset_settings
    from worker.engine import Engine
    from worker.loading import load_engine

    db = f"sqlite:///{tempfile.mkdtemp(prefix='lmqstream-')}/loop.db"
    os.environ["DATABASE_URL"] = db
    os.environ["LMQUEUE_QUEUE_PREFIX"] = f"lmqbench{os.getpid()}"
    reset_settings()
    upgrade_head(db)
    model_dir = bench_model_dir(args.model)
    engine = load_engine(ModelSpec(name="bench", path=str(model_dir)))
    assert isinstance(engine, Engine)
    settings = get_settings()
    backend = engine.slots(settings.max_batch_size, settings.prefill_budget)
    prompts = mixed_prompts(engine.tokenizer, args.jobs, lo=10, hi=120)
    _loop_round(backend, prompts[:4], 4, True)  # warm up
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for stream in (False, True) if r % 2 == 0 else (True, False):
            rates[stream].append(_loop_round(backend, prompts, args.new_tokens, stream))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"loop ({args.model} model, {args.jobs} jobs x {args.new_tokens} tokens, "
        f"{settings.max_batch_size} slots, {args.rounds} rounds):"
    )
    print(f"  0% streaming:   {off:8.1f} tokens/s  (rounds: {_fmt(rates[False])})")
    print(f"  100% streaming: {on:8.1f} tokens/s  (rounds: {_fmt(rates[True])})")
    print(f"  ratio 100%/0%:  {on / off:.3f}")
    off_ms, on_ms = statistics.median(STEP_MS[False]), statistics.median(STEP_MS[True][1:])
    print(f"  mean step (backend.step: forward, sampling, detokenising): {off_ms:.1f} ms at 0%,")
    print(f"    {on_ms:.1f} ms at 100% (streaming rows detokenise every step to have text to send)")
    share = statistics.median(HOOK_SHARE[1:])  # the first is the warm-up
    print(f"  publishing (one pipelined XADD+EXPIRE per row per step) / step time: {share:.2%}")


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in xs)


# ---- submit -> first delta under a backlog --------------------------------------------------


def _first_delta_s(client: httpx.Client, prompt: str) -> float:
    t0 = time.perf_counter()
    resp = client.post(
        "/v1/jobs",
        json={
            "model": "tiny",
            "endpoint": COMPLETIONS,
            "body": {"prompt": prompt, "max_tokens": 8, "temperature": 0},
            "priority": 9,
            "stream": True,
        },
    )
    resp.raise_for_status()
    with client.stream("GET", f"/v1/jobs/{resp.json()['id']}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event:") and line.split(":", 1)[1].strip() == "delta":
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a delta")


def _probe(client: httpx.Client, n: int, tag: str) -> list[float]:
    return [_first_delta_s(client, f"probe {tag} {i}: def main():") for i in range(n)]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def part_latency(args: argparse.Namespace) -> None:
    tiny = bench_model_dir("tiny")
    with bench_stack({"tiny": str(tiny)}) as st:
        st.start_api()
        st.start_worker("tiny")
        with st.client() as client:
            _probe(client, 3, "warm")
            idle = _probe(client, args.probes, "idle")
            body = {"prompt": "x = 1", "max_tokens": 32, "temperature": 0}
            with ThreadPoolExecutor(8) as pool:
                ids = list(
                    pool.map(
                        lambda i: st.submit(
                            client, "tiny", f"backlog {i}: {body['prompt']}", max_tokens=32
                        ),
                        range(args.backlog),
                    )
                )
            queued = client.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()
            busy = _probe(client, args.probes, "busy")
            left = sum(j.status in ("queued", "running") for j in st.jobs(ids))
            st.wait_jobs_done(ids, timeout_s=1200)
    print(f"submit -> first delta (tiny model, {args.probes} probes at priority 9, max_tokens 8):")
    p50, p99 = _pct(idle, 50) * 1e3, _pct(idle, 99) * 1e3
    print(f"  empty queue:         p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
    print(
        f"  {args.backlog}-job backlog:    p50 {_pct(busy, 50) * 1e3:7.1f} ms  "
        f"p99 {_pct(busy, 99) * 1e3:7.1f} ms  ({left} backlog jobs still open after the probes;"
        f" queue non-empty at start: {bool(queued['data'])})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="loop,latency")
    parser.add_argument("--model", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=256)
    parser.add_argument("--probes", type=int, default=40)
    args = parser.parse_args()
    print(
        f"load average: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
    )
    parts = args.parts.split(",")
    if "loop" in parts:
        part_loop(args)
    if "latency" in parts:
        part_latency(args)
    print(
        f"load average: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
