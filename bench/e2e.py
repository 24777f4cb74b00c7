"""End-to-end throughput: the whole service against the engine alone, on a mixed workload.

    python -m bench.e2e [--requests 256] [--probes 8] [--rounds 3]

(a) N prompts of 10-200 tokens, max_tokens drawn from 8-128, through the whole service: HTTP
    submit (one client, in order), Redis, a Celery worker's slot loop, result store, poll;
(b) the same requests through the slot loop in this process (same slots, same prefill budget),
    the probes below included: both phases do the same work.
The phases alternate, (b) (a) (b) (a) ... (b), and each (a) is compared with the mean of the
(b) before and after it: this machine drifts by 10-20% within minutes, more than the effect
measured. Each phase also reports the CPU time the hypervisor stole (/proc/stat).
Per round, from the worker's Prometheus metrics: the mean live rows per decode step while the
backlog ran, and the time from submit to first token (p50, p99) of max_tokens=1 probes
submitted while the backlog runs (same priority: they queue behind it, first in, first out).
Per round, the CPU seconds of each process (bench.cpu_split): the model's two threads, and the
rest of the service (the worker's other threads, the API, this client, Redis), which on a small
machine is what (a)'s steps lose against (b)'s.
Prints tokens/s and the ratio a/b. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench import cpu_split
from bench.common import bench_model_dir, bench_stack, mixed_prompts
from bench.continuous import run_slots, workload
from cli.procs import wait_until
from cli.stack import Stack, completion_job
from lmqueue.registry import ModelSpec
from lmqueue.schemas import COMPLETIONS
from lmqueue.settings import Settings
from worker.engine import Engine
from worker.gen_types import GenRequest
from worker.loading import load_engine
from worker.requests import gen_request

POLL_S = 1.0


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


def stolen() -> tuple[int, int]:
    """(steal, all) CPU ticks so far (/proc/stat): a VM's neighbours show up as steal."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return ticks[7], sum(ticks)


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    return 100 * (after[0] - before[0]) / max(1, after[1] - before[1])


def submit_all(stack: Stack, bodies: list[dict[str, Any]], parallel: int = 16) -> list[str]:
    with stack.client() as client, ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda b: stack.submit(client, "bench", **b), bodies))


class Submitter:
    """POST /v1/jobs over one kept-alive http.client connection. The client shares the two
    cores with the service it measures; httpx cost it ~1.4 ms of CPU a request, this ~0.3 ms."""

    def __init__(self, base_url: str):
        u = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)

    def submit(self, body: dict[str, Any]) -> str:
        payload = json.dumps(completion_job("bench", **body))
        self.conn.request("POST", "/v1/jobs", payload, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        text = resp.read()
        assert resp.status == 202, text
        return str(json.loads(text)["id"])

    def close(self) -> None:
        self.conn.close()


def submit_in_order(stack: Stack, bodies: list[dict[str, Any]]) -> list[str]:
    client = Submitter(stack.base_url)
    try:
        return [client.submit(b) for b in bodies]
    finally:
        client.close()


def redis_pid() -> dict[str, int]:
    """The local redis-server's pid, if one runs here (the machine's or the embedded one)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "redis-server":
                        return {"redis": int(d)}
            except OSError:
                continue
    return {}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Alone:
    """One (b) phase: the slot loop in this process."""

    seconds: float
    steal: float
    steps: int
    cpu: dict[str, float]


@dataclass
class Served:
    """One (a) phase: the whole service."""

    seconds: float
    tokens: int
    submit_s: float
    rows_backlog: float  # mean live rows per decode step while more jobs than slots were open
    rows_all: float
    steps: float
    busy_s: float  # inside a step
    first_token: list[float]
    steal: float
    cpu: dict[str, float]  # CPU seconds by process (bench.cpu_split)


def run_alone(
    run: Callable[[], tuple[float, int]], pids: tuple[int, dict[str, int]] | None = None
) -> Alone:
    """`pids`: the idle stack's, to show what it costs (b) (the first phase has none yet:
    no worker, pid 0 reads as no threads)."""
    worker, others = pids or (0, {"bench": os.getpid()})
    s0, cpu0 = stolen(), cpu_split.snapshot(worker, others)
    seconds, steps = run()
    cpu = cpu_split.split(cpu0, cpu_split.snapshot(worker, others))
    return Alone(seconds, steal_pct(s0, stolen()), steps, cpu)


def run_served(
    stack: Stack,
    metrics: str,
    bodies: list[dict[str, Any]],
    probes: list[dict[str, Any]],
    spread_s: float,
    slots: int,
    pids: tuple[int, dict[str, int]],
) -> Served:
    s0, c0 = live_rows(metrics)
    busy0, steps0 = histogram(metrics, "lmqueue_batch_duration_seconds")
    st0 = stolen()
    cpu0 = cpu_split.snapshot(*pids)
    t0 = time.time()
    # One client, in (b)'s order: the jobs enter the queue, and so start, in the same order
    # in both phases. From 16 client threads they arrived in a random order, and the draining
    # tail, set by the long jobs that happen to start last, took 106-124 steps against (b)'s
    # 102. The submissions take as long either way (0.6-1.0 s).
    ids = submit_in_order(stack, bodies)
    submit_s = time.time() - t0
    probe_ids = []
    for body in probes:  # spread over the first half of the backlog
        time.sleep(spread_s / max(1, len(probes)))
        probe_ids += submit_in_order(stack, [body])
    # "Under a backlog": until fewer jobs than slots are left unfinished (the tail that drains
    # the last rows is counted separately). Polled every POLL_S: the bench's own queries run
    # on the cores the worker computes on (the end is read from the store, not the poll).
    wait_until(lambda: stack.count_open(ids) < slots, 3600, "the backlog to drain", POLL_S)
    s_mid, c_mid = live_rows(metrics)
    jobs = stack.wait_jobs_done(ids, timeout_s=3600, every_s=POLL_S)
    done = stack.wait_jobs_done(probe_ids, timeout_s=3600, every_s=POLL_S)
    steal = steal_pct(st0, stolen())
    cpu = cpu_split.split(cpu0, cpu_split.snapshot(*pids))
    s1, c1 = live_rows(metrics)
    busy1, steps1 = histogram(metrics, "lmqueue_batch_duration_seconds")
    bad = [j.error for j in jobs + done if j.status != "succeeded"]
    assert not bad, bad[:3]
    # Until the last result was stored (the store's clock, this machine's): the poll that
    # noticed it comes up to POLL_S later, and (b) has no such lag.
    seconds = max(j.finished_at or 0 for j in jobs + done) - t0
    return Served(
        seconds=seconds,
        tokens=sum(j.completion_tokens or 0 for j in jobs + done),
        submit_s=submit_s,
        rows_backlog=(s_mid - s0) / max(1, c_mid - c0),
        rows_all=(s1 - s0) / max(1, c1 - c0),
        steps=steps1 - steps0,
        busy_s=busy1 - busy0,
        first_token=[(j.finished_at or 0) - j.created_at for j in done],
        steal=steal,
        cpu=cpu,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    settings = Settings()
    slots, budget, group = settings.max_batch_size, settings.prefill_budget, settings.admit_batch
    model_dir = bench_model_dir()
    engine = load_engine(ModelSpec(name="bench", path=str(model_dir)))
    assert isinstance(engine, Engine)
    tok = engine.tokenizer
    prompts = mixed_prompts(tok, args.requests)
    budgets = [r.max_tokens for r in workload(engine, [tok(p).input_ids for p in prompts])]
    bodies = [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, budgets, strict=True)]
    probes = [{"prompt": p, "max_tokens": 1} for p in prompts[: args.probes]]
    # (b) gets the very requests the worker makes of (a)'s bodies (its tokenization, BOS
    # included), the probes too: both phases do the same work.
    reqs: list[GenRequest] = [
        gen_request(engine, COMPLETIONS, {"model": "bench", "temperature": 0, **body})
        for body in bodies + probes
    ]
    # One slot engine for every (b) phase, as the worker keeps one: its KV buffers are made
    # by the warm-up and reused after (a new one would fault its memory in again each phase).
    loop = engine.slots(slots, budget, group)
    results, _, decode_b, _ = run_slots(engine, reqs, slots, budget, group, loop)  # warm-up
    tokens_b = sum(r.completion_tokens for r in results)

    def alone() -> tuple[float, int]:
        _, seconds, _, steps = run_slots(engine, reqs, slots, budget, group, loop)
        return seconds, steps

    port = free_port()
    env = {"LMQUEUE_WORKER_METRICS_PORT": str(port)}
    print(
        f"requests={args.requests} slots={slots} prefill_budget={budget} admit_batch={group} "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    b = [run_alone(alone)]
    a: list[Served] = []
    with bench_stack({"bench": str(model_dir)}) as stack:
        stack.start_api()
        # As `lmqueue worker` runs it: 2 x slots task threads, so jobs wait in the worker while
        # the slots run and a freed slot never waits on the broker.
        # At the worker's own log level (WARNING), as `lmqueue worker` runs: the test stack's
        # INFO writes two log lines for every message.
        worker = stack.start_worker(
            "bench", concurrency=settings.effective_concurrency(), env=env, log_level=None
        )
        assert stack.api is not None
        others = {"api": stack.api.pid, "bench": os.getpid(), **redis_pid()}
        metrics = f"http://127.0.0.1:{port}/metrics"
        # Warm-up, the whole workload once: the worker's slot buffers grow to their size here,
        # as (b)'s did in its warm-up, not in the first measured round.
        stack.wait_jobs_done(submit_all(stack, bodies), timeout_s=600)
        for r in range(args.rounds):
            a.append(
                run_served(
                    stack, metrics, bodies, probes, b[-1].seconds / 2, slots, (worker.pid, others)
                )
            )
            b.append(run_alone(alone, (worker.pid, others)))
            report_round(r, a[-1], b[-2], b[-1], tokens_b, slots, len(reqs))
    report_total(a, b, tokens_b, decode_b, slots, len(reqs))


def report_round(
    r: int, a: Served, before: Alone, after: Alone, tokens_b: int, slots: int, jobs: int
) -> None:
    rate_a, rate_b = a.tokens / a.seconds, tokens_b / ((before.seconds + after.seconds) / 2)
    print(
        f"round {r + 1}: (a) service {a.tokens} tokens in {a.seconds:.1f} s = {rate_a:.0f} tok/s "
        f"(submissions {a.submit_s:.1f} s, steal {a.steal:.1f}%); (b) slot loop "
        f"{before.seconds:.1f} s before (steal {before.steal:.1f}%), {after.seconds:.1f} s after "
        f"(steal {after.steal:.1f}%): {rate_b:.0f} tok/s; a/b = {rate_a / rate_b:.2f}"
    )
    print(
        f"  live rows per decode step under the backlog {a.rows_backlog:.1f} of {slots}, whole "
        f"run {a.rows_all:.1f}; worker {a.steps:.0f} steps, {a.busy_s:.1f} s of "
        f"{a.seconds:.1f} s inside a step ({1000 * a.busy_s / max(1, a.steps):.0f} ms a step); "
        f"probes' submit -> first token p50 {statistics.median(a.first_token):.1f} s"
    )
    served = cpu_split.service_share(a.cpu)
    print(
        f"  CPU: (a) the model's two threads {a.cpu['worker compute']:.1f} s, the rest of the "
        f"service {served:.1f} s ({1000 * served / max(1, jobs):.1f} ms a job: "
        f"{cpu_split.describe(a.cpu, skip=cpu_split.NOT_SERVICE)}); (b) after "
        f"{after.cpu.get('bench', 0):.1f} s (the idle stack beside it "
        f"{cpu_split.service_share(after.cpu, skip=('bench',)):.1f} s)"
    )
    alone_ms = [1000 * x.seconds / max(1, x.steps) for x in (before, after)]
    print(
        f"  (b) {before.steps} / {after.steps} steps, "
        f"{alone_ms[0]:.0f} / {alone_ms[1]:.0f} ms a step (before / after)"
    )


def report_total(
    a: list[Served],
    b: list[Alone],
    tokens_b: int,
    decode_b: dict[int, list[float]],
    slots: int,
    jobs: int,
) -> None:
    ratios = [
        (x.tokens / x.seconds) / (tokens_b / ((b[i].seconds + b[i + 1].seconds) / 2))
        for i, x in enumerate(a)
    ]
    first = [t for x in a for t in x.first_token]
    steps_b = sum(len(v) for v in decode_b.values())
    step_b = sum(sum(v) for v in decode_b.values()) / max(1, steps_b)
    print(
        f"a/b per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"mean {statistics.mean(ratios):.2f} (goal >= 0.95)"
    )
    print(
        f"mean live rows per decode step under the backlog: "
        f"{statistics.mean(x.rows_backlog for x in a):.1f} of {slots} (goal >= {0.9 * slots:.1f})"
    )
    print(
        f"submit -> first token of {len(first)} max_tokens=1 probes: "
        f"p50 {statistics.median(first):.1f} s, p99 {percentile(first, 0.99):.1f} s"
    )
    print(f"slot loop alone: {1000 * step_b:.0f} ms a decode-only step")
    served = statistics.mean(cpu_split.service_share(x.cpu) for x in a)
    print(
        f"the service's CPU beside the model's threads: {served:.1f} s a round, "
        f"{1000 * served / jobs:.1f} ms a job"
    )


if __name__ == "__main__":
    main()
