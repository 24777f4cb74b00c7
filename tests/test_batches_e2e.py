"""Bulk batches end to end, driven by the official `openai` SDK against the live server: real
API process, Redis, Celery worker and tiny HF model. Runs once per database backend."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack
from lmqueue.batches.ingest import ingest_batch, resume_interrupted_ingests
from lmqueue.batches.state import advance_batches
from lmqueue.broker import reset_producer
from lmqueue.files import sweep_stale_parts
from lmqueue.settings import Settings, reset_settings
from lmqueue.tables import Batch, Job, new_id, now
from tests.batch_client import (
    batch_stack,
    content_lines,
    create,
    line,
    sdk,
    wait_batch,
    wait_done,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def bstack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    yield from batch_stack(database_url, redis_url, tiny_model_dir, tmp_path_factory.mktemp("b"))


def _jobs(stack: Stack, batch_id: str) -> list[Job]:
    with Session(stack.engine) as s:
        return list(s.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)))


def test_openai_sdk_round_trip(bstack: Stack) -> None:
    client = sdk(bstack)
    lines = [line(f"req-{i}", prompt=f"def f{i}(x):") for i in range(12)]
    lines.insert(5, line("too-long", prompt="word " * 400))  # past the 256-token context
    f = client.files.create(file=("input.jsonl", _jsonl(lines)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(_jsonl(lines))
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"project": "round-trip"},
    )
    assert batch.status == "validating"
    batch = wait_done(client, batch.id)

    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (13, 12)
    assert batch.request_counts.failed == 1
    assert batch.metadata == {"project": "round-trip"}
    assert batch.in_progress_at and batch.completed_at and batch.finalizing_at
    with bstack.client() as http:  # batch lines count as submitted jobs too
        metrics = http.get("/metrics").text
    submitted = re.search(
        r'lmqueue_jobs_submitted_total\{model="tiny",source="batch"\} (\S+)', metrics
    )
    assert submitted is not None and float(submitted.group(1)) >= 13

    out = content_lines(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(12)]  # input order
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "text_completion"
        assert o["id"].startswith("batch_req_")
    errors = content_lines(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"

    # The same request as a single job gives the same greedy text.
    with bstack.client() as http:
        job = bstack.wait_job(http, bstack.submit(http, "tiny", "def f3(x):", max_tokens=3))
    assert out[3]["response"]["body"]["choices"][0]["text"] == job["response"]["choices"][0]["text"]

    usage = [o["response"]["body"]["usage"] for o in out]
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usage)
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usage)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens

    out_file = client.files.retrieve(batch.output_file_id or "")
    assert out_file.purpose == "batch_output"
    assert out_file.bytes == len(client.files.content(out_file.id).content)
    assert f.id in {x.id for x in client.files.list(purpose="batch")}
    assert batch.id in {b.id for b in client.batches.list(limit=100)}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)  # completed: too late
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def _nested(depth: int) -> Any:
    out: Any = "x"
    for _ in range(depth):
        out = [out]
    return out


def test_invalid_lines_fail_validation_with_line_numbers(bstack: Stack) -> None:
    client = sdk(bstack)
    lines: list[Any] = [
        line("ok-1"),  # 1
        '{"custom_id": "broken", "method": ',  # 2 invalid JSON
        {k: v for k, v in line("x").items() if k != "custom_id"},  # 3 no custom_id
        line("ok-1"),  # 4 duplicate of line 1
        line("wrong-url", url="/v1/chat/completions"),  # 5 url != endpoint
        {**line("get"), "method": "GET"},  # 6
        line("nope", model="no-such-model"),  # 7 unknown model
        line("bad-body", max_tokens=-1),  # 8 body fails the schema
        line("embed-url", model="emb"),  # 9 an embedding model on /v1/completions
        line("ok-2"),  # 10
        "[" * 100_000 + "]" * 100_000,  # 11 nested too deeply for any JSON parser
        line("deep", prompt=_nested(500)),  # 12 parses, but a body no schema accepts
    ]
    batch = wait_done(client, create(client, lines).id)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.object == "list"
    got = {(e.line, e.code, e.param) for e in batch.errors.data or []}
    assert got == {
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_url", "url"),
        (6, "invalid_method", "method"),
        (7, "model_not_found", "body.model"),
        (8, "invalid_value", "body.max_tokens"),
        (9, "unsupported_endpoint", "body.model"),
        (11, "invalid_json_line", None),
        (12, "invalid_value", "body.prompt.str"),
    }
    assert "line 1" in next(e.message or "" for e in batch.errors.data or [] if e.line == 4)
    assert _jobs(bstack, batch.id) == []  # nothing inserted, nothing enqueued
    assert batch.request_counts is not None and batch.request_counts.total == 0


def test_lines_are_metered_in_bulk_messages_then_cancelled(bstack: Stack) -> None:
    """The dispatcher sends a model's window of lines (no worker: one worker's slots and hold)
    in messages of 32 ids; the rest stay held in the store, not in Redis."""
    import redis

    client = sdk(bstack)
    n = 1000
    batch = create(client, [line(f"q{i}", model="idle") for i in range(n)])
    batch = wait_batch(client, batch.id, lambda b: b.status != "validating")
    assert batch.status == "in_progress" and batch.request_counts.total == n
    window = 3 * Settings().max_batch_size  # slots + hold (2 x slots), nothing drained yet

    def sent() -> list[Job] | None:
        jobs = _jobs(bstack, batch.id)
        return jobs if sum(1 for j in jobs if j.enqueued_at) >= window else None

    jobs = wait_until(sent, 30, "the dispatcher to send a window of lines", every_s=0.1)
    assert [j.line_no for j in jobs] == list(range(1, n + 1))
    assert [j.custom_id for j in jobs] == [f"q{i}" for i in range(n)]
    assert {j.priority for j in jobs} == {2}
    assert [bool(j.enqueued_at) for j in jobs] == [True] * window + [False] * (n - window)
    r = redis.Redis.from_url(bstack.redis_url)
    key = f"{bstack.key_prefix}{bstack.queue('idle')}:7"  # API priority 2 -> kombu's 9 - 2
    messages = [json.loads(m) for m in r.lrange(key, 0, -1)]
    r.close()
    assert len(messages) == window // 32
    assert all(m["headers"]["task"] == "lmqueue.process_jobs" for m in messages)

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = wait_done(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    assert batch.output_file_id is None
    errors = content_lines(client, batch.error_file_id)
    assert len(errors) == n
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling twice is fine


def test_cancel_mid_run_keeps_finished_lines_and_pages_results(bstack: Stack) -> None:
    client = sdk(bstack)
    lines = [line(f"done-{i}") for i in range(6)] + [
        line(f"never-{i}", model="idle") for i in range(10)
    ]
    batch = create(client, lines)
    batch = wait_batch(
        client, batch.id, lambda b: b.request_counts and b.request_counts.completed == 6
    )
    assert batch.status == "in_progress"

    seen: list[str] = []
    after = ""
    with bstack.client() as http:

        def page(limit: int) -> tuple[list[str], bool]:
            nonlocal after
            resp = http.get(
                f"/v1/batches/{batch.id}/results", params={"after": after, "limit": limit}
            )
            assert resp.status_code == 200, resp.text
            after = resp.headers["X-Next-After"]
            ids = [json.loads(x)["custom_id"] for x in resp.text.splitlines()]
            seen.extend(ids)
            return ids, resp.headers["X-Results-Complete"] == "true"

        assert page(4) == (["done-0", "done-1", "done-2", "done-3"], False)
        assert page(4) == (["done-4", "done-5"], False)
        assert page(4) == ([], False)  # the rest is still queued
        running = client.batches.retrieve(batch.id)
        assert running.estimated_completion_at >= running.in_progress_at  # type: ignore[attr-defined]

        client.batches.cancel(batch.id)
        batch = wait_done(client, batch.id)
        assert batch.status == "cancelled"
        rest, complete = page(100)
        assert complete and rest == [f"never-{i}" for i in range(10)]
    assert sorted(seen) == sorted(x["custom_id"] for x in lines)  # each exactly once
    assert len(seen) == len(set(seen))

    out = content_lines(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"done-{i}" for i in range(6)]
    errors = content_lines(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == [f"never-{i}" for i in range(10)]
    assert batch.request_counts.completed == 6 and batch.request_counts.failed == 10


def test_expiry_by_completion_window(bstack: Stack) -> None:
    client = sdk(bstack)
    batch = create(
        client, [line(f"late-{i}", model="idle") for i in range(3)], completion_window="2s"
    )
    assert batch.expires_at - batch.created_at == 2
    batch = wait_done(client, batch.id, timeout_s=30)
    assert batch.status == "expired" and batch.expired_at
    errors = content_lines(client, batch.error_file_id)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert len(errors) == 3


def test_expiry_advanced_by_the_scheduler_entry_point(bstack: Stack) -> None:
    client = sdk(bstack)
    lines = [line(f"a{i}") for i in range(3)] + [line(f"b{i}", model="idle") for i in range(3)]
    batch = create(client, lines, completion_window="1h")
    wait_batch(client, batch.id, lambda b: b.request_counts and b.request_counts.completed == 3)
    with Session(bstack.engine) as s:
        s.execute(update(Batch).where(Batch.id == batch.id).values(expires_at=0))
        s.commit()
        assert advance_batches(s) >= 1  # what the scheduler process calls periodically
        s.commit()
        assert s.get(Batch, batch.id).status == "expired"  # type: ignore[union-attr]
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "expired"
    assert [o["custom_id"] for o in content_lines(client, batch.output_file_id)] == [
        "a0",
        "a1",
        "a2",
    ]
    errors = content_lines(client, batch.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (f"b{i}", "batch_expired") for i in range(3)
    ]


def test_embeddings_lines_are_accepted_for_embedding_models(bstack: Stack) -> None:
    client = sdk(bstack)
    lines = [line(f"e{i}", model="emb", url="/v1/embeddings", prompt=f"text {i}") for i in range(3)]
    batch = create(client, lines, endpoint="/v1/embeddings")
    batch = wait_batch(client, batch.id, lambda b: b.status != "validating")
    assert batch.status == "in_progress" and batch.model == "emb"
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")


def test_request_errors_are_4xx(bstack: Stack) -> None:
    client = sdk(bstack)
    f = client.files.create(file=("in.jsonl", _jsonl([line("a")])), purpose="batch")

    def create_with(**kw: Any) -> None:
        args = {"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "24h"}
        client.batches.create(**{**args, **kw})  # type: ignore[arg-type]

    cases: list[tuple[dict[str, Any], str]] = [
        ({"input_file_id": "file_nope"}, "input_file_id"),
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"completion_window": "0s"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.APIStatusError) as info:
            create_with(**kw)
        assert info.value.status_code in (400, 404), kw
        assert info.value.body["param"] == param, (kw, info.value.body)  # type: ignore[index]
    for window in ("30m", "90s", "7d"):
        create_with(completion_window=window, metadata={"k": "v"})
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_upload_limits(bstack: Stack) -> None:
    from tests.batch_client import MAX_FILE_BYTES, MAX_LINES

    client = sdk(bstack)
    with pytest.raises(openai.BadRequestError) as too_many:
        client.files.create(file=("many.jsonl", b"{}\n" * (MAX_LINES + 1)), purpose="batch")
    assert too_many.value.body["code"] == "too_many_lines"  # type: ignore[index]
    big = b"x" * (MAX_FILE_BYTES + 100_000)  # refused from its Content-Length
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", big), purpose="batch")
    assert too_big.value.status_code == 413
    # Without a Content-Length (chunked), the limit is enforced while streaming to disk.
    boundary = "lmqboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(MAX_FILE_BYTES // 65536 + 2):
            yield b"y" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    with bstack.client() as http:
        resp = http.post(
            "/v1/files",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "file_too_large"
    leftovers = [
        p for p in (bstack.log_dir.parent / "data" / "files").iterdir() if p.suffix == ".part"
    ]
    assert leftovers == []


def test_retry_failed_runs_only_the_failed_lines(bstack: Stack) -> None:
    client = sdk(bstack)
    lines = [line("ok-0"), line("ok-1")] + [line(f"redo-{i}", model="idle") for i in range(3)]
    parent = create(client, lines)
    wait_batch(client, parent.id, lambda b: b.request_counts and b.request_counts.completed == 2)
    with pytest.raises(openai.ConflictError):
        client.post(f"/batches/{parent.id}/retry_failed", cast_to=object)
    client.batches.cancel(parent.id)
    assert wait_done(client, parent.id).status == "cancelled"

    child = client.post(f"/batches/{parent.id}/retry_failed", cast_to=dict)
    assert isinstance(child, dict)
    assert child["parent_batch_id"] == parent.id and child["status"] == "validating"
    child_id = child["id"]
    batch = wait_batch(client, child_id, lambda b: b.status != "validating")
    assert batch.status == "in_progress" and batch.request_counts.total == 3
    assert [j.custom_id for j in _jobs(bstack, child_id)] == [f"redo-{i}" for i in range(3)]

    worker = bstack.start_worker("idle", concurrency=4)  # the lines can run now
    try:
        batch = wait_done(client, child_id)
    finally:
        worker.stop()
    assert batch.status == "completed"
    out = content_lines(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"redo-{i}" for i in range(3)]
    with pytest.raises(openai.BadRequestError):
        client.post(f"/batches/{child_id}/retry_failed", cast_to=object)  # nothing failed


def test_cli_batch_run(bstack: Stack, tmp_path: Path) -> None:
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl([line(f"c{i}") for i in range(5)] + [line("long", prompt="w " * 400)]))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    env = {**bstack.env, "LMQUEUE_API_URL": bstack.base_url}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "batch",
            "run",
            str(src),
            "-o",
            str(out),
            "--errors",
            str(err),
            "--window",
            "1h",
            "--poll",
            "0.2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr  # one line failed
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [
        f"c{i}" for i in range(5)
    ]
    assert [json.loads(x)["custom_id"] for x in err.read_text().splitlines()] == ["long"]
    assert "5 completed, 1 failed of 6" in run.stderr
    # No terminal here: plain progress lines instead of a bar, and no httpx line per poll.
    assert ": completed, 5 completed, 1 failed of 6" in run.stderr, run.stderr
    assert "HTTP Request" not in run.stderr and "it/s" not in run.stderr
    batch_id = re.search(r"batch (batch_\w+)", run.stderr).group(1)  # type: ignore[union-attr]
    status = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "status", batch_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(status.stdout)["status"] == "completed"
    results = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "results", batch_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len(results.stdout.splitlines()) == 6 and "complete" in results.stderr


@pytest.fixture
def producer_for(bstack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let this test process act on the stack's store and queues (as the scheduler would)."""
    names = ("LMQUEUE_QUEUE_PREFIX", "REDIS_URL", "DATABASE_URL", "LMQUEUE_DATA_DIR")
    for name in (*names, "LMQUEUE_CACHE_ENABLED"):
        monkeypatch.setenv(name, bstack.env[name])
    monkeypatch.setenv("LMQUEUE_MODELS", bstack.env["LMQUEUE_MODELS"])
    monkeypatch.setenv("LMQUEUE_DEPLOYMENT", bstack.key_prefix[:-1])
    reset_settings()
    reset_producer()
    yield
    monkeypatch.undo()
    reset_settings()
    reset_producer()


def _stale_batch(s: Session, input_file_id: str) -> str:
    batch_id = new_id("batch")
    s.add(
        Batch(
            id=batch_id,
            endpoint="/v1/completions",
            input_file_id=input_file_id,
            completion_window="24h",
            status="validating",
            created_at=now() - 3600,
            expires_at=now() + 3600,
        )
    )
    return batch_id


def test_stale_validating_batches_are_recovered(bstack: Stack, producer_for: None) -> None:
    """The API process died while ingesting. Lines committed but never enqueued: advance_batches
    sends them. Nothing committed: the scheduler's housekeeping ingests the input file again
    (idempotently), or fails the batch if the file is gone."""
    client = sdk(bstack)
    intact = client.files.create(
        file=("in.jsonl", _jsonl([line(f"i{i}") for i in range(4)])), purpose="batch"
    )
    with Session(bstack.engine) as s:
        resumed = _stale_batch(s, "file_gone")
        lost = _stale_batch(s, "file_gone")
        interrupted = _stale_batch(s, intact.id)
        for i in range(3):
            body = {"model": "tiny", "prompt": f"x{i}", "max_tokens": 2, "temperature": 0}
            s.add(
                Job(
                    id=f"{resumed}_{i}",
                    model="tiny",
                    endpoint="/v1/completions",
                    body=body,
                    batch_id=resumed,
                    custom_id=f"r{i}",
                    line_no=i + 1,
                    priority=2,
                )
            )
        s.commit()
        assert resume_interrupted_ingests() == 2  # `lost` and `interrupted`
        assert advance_batches(s) >= 1
        s.commit()
    failed = client.batches.retrieve(lost)
    assert failed.status == "failed"
    assert failed.errors.data[0].code == "input_file_missing"  # type: ignore[union-attr]
    batch = wait_done(client, resumed)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    batch = wait_done(client, interrupted)
    assert batch.status == "completed" and batch.request_counts.completed == 4
    jobs = _jobs(bstack, interrupted)
    assert all(j.task_id and j.task_id.startswith(interrupted) for j in jobs)

    # A second ingest of the same batch (two processes resuming it) stores no line twice.
    with Session(bstack.engine) as s:
        s.execute(update(Batch).where(Batch.id == interrupted).values(status="validating"))
        s.commit()
    ingest_batch(interrupted)
    assert len(_jobs(bstack, interrupted)) == 4


def test_stale_upload_parts_are_swept(bstack: Stack, producer_for: None) -> None:
    files = Path(bstack.env["LMQUEUE_DATA_DIR"]) / "files"
    files.mkdir(parents=True, exist_ok=True)
    stale, fresh = files / ".upload-killed.part", files / ".upload-live.part"
    for part in (stale, fresh):
        part.write_bytes(b"x" * 1000)
    old = now() - 3600
    os.utime(stale, (old, old))
    assert sweep_stale_parts() == 1
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
