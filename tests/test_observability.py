"""Observability against a real stack: Flower (behind basic auth) shows each request's Celery
task reaching SUCCESS; Prometheus metrics on the API (queue depth) and on the worker (micro-batch,
tokens, outcomes, model load time); /readyz reports what is missing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kombu import Connection

from cli.procs import free_port, wait_until
from cli.stack import Stack, running
from lmqueue.broker import celery_config
from lmqueue.db import make_engine
from lmqueue.readiness import readiness
from tests.flower_proc import flower_process

pytestmark = pytest.mark.timeout(180)

FLOWER_AUTH = ("ops", "s3cret-flower-pass")


@pytest.fixture(scope="module")
def metrics_stack(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    db = f"sqlite:///{tmp_path_factory.mktemp('obs') / 'lmqueue.db'}"
    st = Stack(
        db,
        redis_url,
        {"tiny": tiny_model_dir, "idle": tiny_model_dir},
        tmp_path_factory.mktemp("l"),
    )
    with running(st):
        yield st


@pytest.fixture(scope="module")
def flower(metrics_stack: Stack) -> Iterator[str]:
    """`lmqueue flower` as a process, basic auth from LMQUEUE_FLOWER_BASIC_AUTH."""
    with flower_process(metrics_stack, FLOWER_AUTH) as url:
        yield url


@pytest.fixture(scope="module")
def worker_metrics(metrics_stack: Stack, flower: str) -> str:
    """A worker for "tiny" serving Prometheus metrics (started after Flower listens)."""
    port = free_port()
    metrics_stack.start_worker("tiny", env={"LMQUEUE_WORKER_METRICS_PORT": str(port)})
    return f"http://127.0.0.1:{port}/metrics"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, or None when it is absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return None


def test_flower_shows_the_request_task_succeeding(
    metrics_stack: Stack, flower: str, worker_metrics: str
) -> None:
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/api/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401
    with metrics_stack.client() as client:
        job_id = metrics_stack.submit(client, "tiny", "seen by flower", max_tokens=2)
        job = metrics_stack.wait_job(client, job_id)
        assert job["status"] == "succeeded"

    def task() -> dict[str, Any] | None:
        resp = httpx.get(
            f"{flower}/api/tasks",
            params={"taskname": "lmqueue.process_jobs"},
            auth=FLOWER_AUTH,
            timeout=5,
        )
        assert resp.status_code == 200, resp.text
        for t in resp.json().values():
            if job_id in str(t.get("kwargs")) and t["state"] == "SUCCESS":
                return dict(t)
        return None

    found = wait_until(task, 30, "Flower to show the task as SUCCESS", every_s=0.3)
    assert found["name"] == "lmqueue.process_jobs"
    assert found["worker"].startswith("tiny-")
    assert found["uuid"] == job["task_id"]  # the job leads to its task, and back


def test_worker_metrics(metrics_stack: Stack, worker_metrics: str) -> None:
    with metrics_stack.client() as client:
        ids = [metrics_stack.submit(client, "tiny", f"metrics {i}", max_tokens=3) for i in range(4)]
        jobs = [metrics_stack.wait_job(client, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    text = httpx.get(worker_metrics, timeout=5).text
    tiny = {"model": "tiny"}
    assert (sample(text, "lmqueue_batch_size_count", **tiny) or 0) >= 1
    assert (sample(text, "lmqueue_batch_size_sum", **tiny) or 0) >= 4
    prompt = sum(j["response"]["usage"]["prompt_tokens"] for j in jobs)
    completion = sum(j["response"]["usage"]["completion_tokens"] for j in jobs)
    assert (sample(text, "lmqueue_prompt_tokens_total", **tiny) or 0) >= prompt
    assert (sample(text, "lmqueue_generation_tokens_total", **tiny) or 0) >= completion
    assert (sample(text, "lmqueue_generation_tokens_per_second", **tiny) or 0) > 0
    assert (sample(text, "lmqueue_jobs_finished_total", model="tiny", status="succeeded") or 0) >= 4
    assert (sample(text, "lmqueue_e2e_request_latency_seconds_count", **tiny) or 0) >= 4
    assert (sample(text, "lmqueue_request_queue_time_seconds_count", **tiny) or 0) >= 4
    assert (sample(text, "lmqueue_model_load_seconds", **tiny) or 0) > 0


def test_api_metrics_report_queue_depth(metrics_stack: Stack) -> None:
    with metrics_stack.client() as client:
        ids = [metrics_stack.submit(client, "idle", f"waiting {i}") for i in range(3)]
        text = client.get("/metrics").text
        assert sample(text, "lmqueue_queue_depth", model="idle", state="waiting") == 3
        assert sample(text, "lmqueue_num_requests_waiting", model="idle") == 3
        assert (sample(text, "lmqueue_jobs_submitted_total", model="idle", source="job") or 0) >= 3

        # A message delivered and not yet acked counts as reserved, not waiting.
        opts = celery_config(metrics_stack.settings())["broker_transport_options"]
        with Connection(metrics_stack.redis_url, transport_options=opts) as conn:
            queue = conn.SimpleQueue(metrics_stack.queue("idle"), no_ack=False)
            message = queue.get(timeout=10)
            text = client.get("/metrics").text
            assert sample(text, "lmqueue_queue_depth", model="idle", state="waiting") == 2
            assert sample(text, "lmqueue_queue_depth", model="idle", state="reserved") == 1
            message.requeue()
            queue.close()
        text = client.get("/metrics").text
        assert sample(text, "lmqueue_queue_depth", model="idle", state="reserved") == 0
        for i in ids:
            client.post(f"/v1/jobs/{i}/cancel")
        text = client.get("/metrics").text
    assert sample(text, "lmqueue_num_requests_waiting", model="idle") == 0
    assert (sample(text, "lmqueue_jobs_finished_total", model="idle", status="cancelled")) == 3


def test_readyz(metrics_stack: Stack, tmp_path: Path) -> None:
    resp = httpx.get(f"{metrics_stack.base_url}/readyz", timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"] == {"store": "ok", "broker": "ok"}

    # The same checks against an empty database and a Redis that is not there.
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    problems = readiness(engine, f"redis://127.0.0.1:{free_port()}/0")
    engine.dispose()
    assert "migrations not at head" in (problems["store"] or "")
    assert "does not answer" in (problems["broker"] or "")


def test_worker_metrics_count_shared_prefix_reuse(
    metrics_stack: Stack, worker_metrics: str
) -> None:
    """Bulk lines travel 32 to a message, so these four land in one micro-batch; they share a
    long prompt prefix, which the engine prefills once and the worker's counters report."""
    header = "def shared(x):\n    return x * 2 + 1\n" * 6  # well over the 32-token minimum
    lines = [
        {
            "custom_id": f"p{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": f"{header}# case {i}", "max_tokens": 2},
        }
        for i in range(4)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with metrics_stack.client() as client:
        upload = client.post(
            "/v1/files", files={"file": ("p.jsonl", content)}, data={"purpose": "batch"}
        )
        assert upload.status_code == 200, upload.text
        batch = client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/completions",
                "completion_window": "1h",
            },
        ).json()

        def done() -> dict[str, Any] | None:
            b: dict[str, Any] = client.get(f"/v1/batches/{batch['id']}").json()
            return b if b["status"] in ("completed", "failed") else None

        finished = wait_until(done, 120, "the prefix batch to finish", every_s=0.2)
    assert finished["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    text = httpx.get(worker_metrics, timeout=5).text
    assert (sample(text, "lmqueue_prefix_reuse_requests_total", model="tiny") or 0) >= 4
    assert (sample(text, "lmqueue_prefix_cache_hits_total", model="tiny") or 0) > 0
    assert (sample(text, "lmqueue_prefix_cache_queries_total", model="tiny") or 0) >= (
        sample(text, "lmqueue_prefix_cache_hits_total", model="tiny") or 0
    )
