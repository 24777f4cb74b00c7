"""The whole path, real end to end: REST submit -> Redis -> Celery worker micro-batching a real
HF model -> result store -> poll. Runs once per database backend (SQLite, Postgres)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.stack import Stack

pytestmark = pytest.mark.timeout(300)


def reference_greedy(model_dir: Path, prompt: str, max_tokens: int) -> tuple[str, int, int]:
    """Plain transformers on this prompt, alone: (text, prompt tokens, completion tokens)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    if tok.bos_token_id is not None and ids[0, 0].item() != tok.bos_token_id:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_tokens,
        pad_token_id=tok.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True), ids.shape[1], len(new)


def test_submit_poll_returns_correct_text_and_usage(stack: Stack, tiny_model_dir: Path) -> None:
    prompt = "def fibonacci(n):"
    with stack.client() as client:
        job_id = stack.submit(client, "tiny", prompt, max_tokens=12)
        job = stack.wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    body = job["response"]
    text, prompt_tokens, completion_tokens = reference_greedy(tiny_model_dir, prompt, 12)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == text
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},  # issue 13: prefix reuse is reported
    }


def test_chat_completion(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "endpoint": "/v1/chat/completions",
                "body": {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                    "temperature": 0,
                },
            },
        )
        assert resp.status_code == 202, resp.text
        job = stack.wait_job(client, resp.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["response"]["object"] == "chat.completion"
    assert job["response"]["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= job["response"]["usage"]["completion_tokens"] <= 5


def test_concurrent_submissions_are_micro_batched(stack: Stack) -> None:
    prompts = [f"item {i}: " + "x = 1\n" * (i % 7 + 1) for i in range(64)]
    with stack.client() as client, ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda p: stack.submit(client, "tiny", p, max_tokens=4), prompts))
    jobs = stack.wait_jobs_done(ids)
    assert all(j.status == "succeeded" for j in jobs), [j.error for j in jobs if j.error]
    batches = {j.microbatch_id for j in jobs}
    assert len(batches) < len(ids), "64 requests were served by 64 separate generate calls"
    assert max(j.microbatch_size or 0 for j in jobs) > 1
    assert all(j.attempts == 1 for j in jobs)


def test_sampled_decoding_honours_seed(stack: Stack) -> None:
    body = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 8}
    with stack.client() as client:
        a = stack.submit(client, "tiny", "import os", **body)
        b = stack.submit(client, "tiny", "import os", **body)
        texts = [stack.wait_job(client, i)["response"]["choices"][0]["text"] for i in (a, b)]
    assert texts[0] == texts[1]


def test_idempotency_key_returns_the_same_job(stack: Stack) -> None:
    req = {
        "model": "tiny",
        "endpoint": "/v1/completions",
        "body": {"prompt": "same", "max_tokens": 2, "temperature": 0},
    }
    with stack.client() as client:
        key = {"Idempotency-Key": f"k-{stack.queue_prefix}"}
        first = client.post("/v1/jobs", json=req, headers=key)
        second = client.post("/v1/jobs", json=req, headers=key)
        assert first.status_code == 202 and second.status_code == 200
        assert first.json()["id"] == second.json()["id"]
        other = client.post("/v1/jobs", json={**req, "body": {"prompt": "different"}}, headers=key)
        assert other.status_code == 409
        assert "Idempotency-Key" in other.json()["error"]["message"]


def test_cancel_a_queued_job(stack: Stack) -> None:
    with stack.client() as client:
        job_id = stack.submit(client, "idle", "never runs: no worker serves this model")
        resp = client.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        done = stack.submit(client, "tiny", "finished", max_tokens=1)
        stack.wait_job(client, done)
        late = client.post(f"/v1/jobs/{done}/cancel")
        assert late.status_code == 409
        assert client.post("/v1/jobs/job_nope/cancel").status_code == 404


def test_a_too_long_request_fails_alone(stack: Stack) -> None:
    long_prompt = "word " * 400  # well past the tiny model's 256-token context
    with stack.client() as client, ThreadPoolExecutor(4) as pool:
        prompts = ["short one", long_prompt, "short two", "short three"]
        ids = list(pool.map(lambda p: stack.submit(client, "tiny", p, max_tokens=3), prompts))
        jobs = [stack.wait_job(client, i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert jobs[1]["error"]["code"] == "context_length_exceeded"
    assert "context length" in jobs[1]["error"]["message"]


def test_list_jobs_with_cursor_and_status_filter(stack: Stack) -> None:
    with stack.client() as client:
        ids = [stack.submit(client, "idle", f"listed {i}") for i in range(5)]
        seen: list[str] = []
        after = None
        while True:
            params = {"limit": 2, "status": "queued", **({"after": after} if after else {})}
            page = client.get("/v1/jobs", params=params).json()
            seen += [j["id"] for j in page["data"]]
            assert all(j["status"] == "queued" for j in page["data"])
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert set(ids) <= set(seen)
        assert len(seen) == len(set(seen))
        for i in ids:
            client.post(f"/v1/jobs/{i}/cancel")


def test_models_and_health(stack: Stack) -> None:
    with stack.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"tiny", "idle"}
