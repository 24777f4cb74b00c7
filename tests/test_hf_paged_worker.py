"""A real Celery worker process serving a model registered with `engine = "hf-paged"`
(transformers' continuous batching behind the backend seam) completes real jobs: greedy text
equal to plain transformers, stop strings, chat, per-row refusals naming the field, and a
running job cancelled through the API."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.procs import wait_until
from cli.stack import Stack, running
from tests.conftest import MODEL_CACHE
from tests.test_jobs_e2e import reference_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def paged_stack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    from worker.demo_model import build_demo_model

    long_dir = build_demo_model(MODEL_CACHE / "tiny-long", size="tiny-long")
    logs = tmp_path_factory.mktemp("hf-paged")
    models = logs / "models.toml"
    models.write_text(
        f'[models.paged]\npath = "{tiny_model_dir}"\nengine = "hf-paged"\n'
        "max_context = 256\nmax_batch_size = 4\n"
        f'[models.paged-long]\npath = "{long_dir}"\nengine = "hf-paged"\nmax_batch_size = 2\n'
    )
    st = Stack(
        database_url,
        redis_url,
        {"paged": tiny_model_dir, "paged-long": long_dir},
        logs,
        extra_env={"LMQUEUE_MODELS_FILE": str(models), "LMQUEUE_CANCEL_POLL_S": "0.1"},
    )
    with running(st, ["paged", "paged-long"]):
        yield st


def submit(client: httpx.Client, body: dict[str, Any], model: str = "paged") -> str:
    resp = client.post(
        "/v1/jobs", json={"model": model, "endpoint": "/v1/completions", "body": body}
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_hf_paged_worker_completes_jobs(paged_stack: Stack, tiny_model_dir: Path) -> None:
    prompts = [(f"def f{i}(x):\n    return x" + " +" * i, 3 + 2 * i) for i in range(8)]
    with paged_stack.client() as client, ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda p: submit(client, {"prompt": p[0], "max_tokens": p[1], "temperature": 0}),
                prompts,
            )
        )
        jobs = [paged_stack.wait_job(client, i) for i in ids]
    for (prompt, max_tokens), job in zip(prompts, jobs, strict=True):
        assert job["status"] == "succeeded", job
        text, n_prompt, n_completion = reference_greedy(tiny_model_dir, prompt, max_tokens)
        choice = job["response"]["choices"][0]
        assert choice["text"] == text
        assert job["response"]["usage"]["prompt_tokens"] == n_prompt
        assert job["response"]["usage"]["completion_tokens"] == n_completion
        assert job["attempts"] == 1


def test_hf_paged_worker_stops_and_refuses(paged_stack: Stack, tiny_model_dir: Path) -> None:
    prompt = "import os\n"
    full, _, _ = reference_greedy(tiny_model_dir, prompt, 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    with paged_stack.client() as client:
        stopped = submit(
            client, {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": stop}
        )
        sampled = submit(client, {"prompt": prompt, "max_tokens": 4})  # OpenAI default: 1.0
        seeded = submit(client, {"prompt": prompt, "max_tokens": 4, "temperature": 0, "seed": 7})
        chat = client.post(
            "/v1/jobs",
            json={
                "model": "paged",
                "endpoint": "/v1/chat/completions",
                "body": {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                    "temperature": 0,
                },
            },
        ).json()["id"]
        done = {i: paged_stack.wait_job(client, i) for i in (stopped, sampled, seeded, chat)}
    assert done[chat]["status"] == "succeeded", done[chat]
    assert done[chat]["response"]["object"] == "chat.completion"
    assert 1 <= done[chat]["response"]["usage"]["completion_tokens"] <= 5
    choice = done[stopped]["response"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.find(stop)]
    for job_id, param in ((sampled, "temperature"), (seeded, "seed")):
        job = done[job_id]
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "unsupported_parameter"
        assert job["error"]["param"] == param
        assert job["error"]["type"] == "invalid_request_error"
        assert "hf-paged" in job["error"]["message"]


def test_hf_paged_worker_cancels_a_running_job(paged_stack: Stack) -> None:
    body = {"prompt": "def main():", "temperature": 0, "max_tokens": 4000}
    with paged_stack.client() as client:
        long = submit(client, body, model="paged-long")

        def state(job_id: str) -> str:
            return str(client.get(f"/v1/jobs/{job_id}").json()["status"])

        wait_until(lambda: state(long) == "running", 60, "the long job to run", every_s=0.05)
        assert client.post(f"/v1/jobs/{long}/cancel").status_code == 200
        gone = paged_stack.wait_job(client, long, timeout_s=30)
        short = submit(client, {**body, "max_tokens": 3}, model="paged-long")
        done = paged_stack.wait_job(client, short, timeout_s=60)
    assert gone["status"] == "cancelled" and gone["response"] is None, gone
    assert gone["error"]["code"] == "cancelled"
    assert done["status"] == "succeeded", done
    assert done["response"]["usage"]["completion_tokens"] == 3
