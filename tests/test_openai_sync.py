"""OpenAI's synchronous endpoints through the queue, driven by the official `openai` SDK
against a real stack (API, Redis, a Celery worker with the tiny demo model): the answers are
the queued job's, streams add up to them, and a client that hangs up cancels its job."""

from __future__ import annotations

import os
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.tables import Job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "def main():"


def sdk(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused-auth-is-off", max_retries=0)


def queued_job(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as client:
        return dict(client.get(f"/v1/jobs/{job_id}").json())


def test_completions_with_and_without_stream(stack: Stack) -> None:
    client = sdk(stack)
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.object == "text_completion" and done.model == "tiny"
    assert done.usage is not None and done.usage.completion_tokens == 16
    text = done.choices[0].text
    assert done.choices[0].finish_reason == "length" and text
    # It went through the queue: the id is the job's, and the job says so.
    job = queued_job(stack, done.id.removeprefix("cmpl-"))
    assert job["status"] == "succeeded" and job["response"]["choices"][0]["text"] == text

    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stream=True
        )
    )
    assert len(chunks) >= 2 and all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_with_and_without_stream(stack: Stack) -> None:
    client = sdk(stack)
    messages: Any = [{"role": "user", "content": "Say hello"}]
    done = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    assert done.object == "chat.completion"
    content = done.choices[0].message.content
    assert done.choices[0].message.role == "assistant" and content

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_bad_requests_are_openai_errors(stack: Stack) -> None:
    client = sdk(stack)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert "max_tokens" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError):  # a model that does not embed
        client.embeddings.create(model="tiny", input="x")
    # A job that fails answers its stored error with its status.
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="word " * 400, max_tokens=2)
    assert exc.value.code == "context_length_exceeded"


def _idle_job(stack: Stack, prompt: str) -> Job | None:
    with Session(stack.engine) as s:
        jobs = s.scalars(select(Job).where(Job.model == "idle")).all()
        return next((j for j in jobs if j.body.get("prompt") == prompt), None)


def _wait_cancelled(stack: Stack, prompt: str) -> Job:
    def cancelled() -> Job | None:
        job = _idle_job(stack, prompt)
        return job if job is not None and job.status == "cancelled" else None

    job: Job = wait_until(cancelled, 30, "the abandoned job to be cancelled", every_s=0.2)
    return job


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_hangs_up_cancels_its_job(stack: Stack, stream: bool) -> None:
    """Model "idle" has no worker: the request waits until the client gives up."""
    prompt = f"nobody waits for this {stream} {os.urandom(4).hex()}"
    body = {"model": "idle", "prompt": prompt, "max_tokens": 4, "stream": stream}
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                wait_until(lambda: _idle_job(stack, prompt), 30, "the job", every_s=0.2)
            # leaving the block closed the connection
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=2))
    job = _wait_cancelled(stack, prompt)
    assert job.error is not None and job.error["code"] == "cancelled"
