"""Job and batch server-sent events against a real stack (API, Redis, a Celery worker running
the tiny demo model): order, deltas that add up to the stored text, late connectors, and
Last-Event-ID resumes without gaps or repeats."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cli.procs import wait_until
from cli.stack import Stack
from tests.sse_client import Event, read_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def submit(client: httpx.Client, model: str, prompt: str, stream: bool, **body: Any) -> str:
    resp = client.post(
        "/v1/jobs",
        json={
            "model": model,
            "endpoint": "/v1/completions",
            "body": {"prompt": prompt, "temperature": 0, **body},
            "stream": stream,
        },
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def assert_same_text(final: str, streamed: str) -> None:
    """The deltas carry the text; the stored result may end with U+FFFD for trailing bytes of
    an incomplete UTF-8 character, which a stream holds back (the tiny model emits any byte)."""
    assert final.startswith(streamed) and set(final[len(streamed) :]) <= {"\ufffd"}, (
        final,
        streamed,
    )


def check_job_story(events: list[Event]) -> str:
    """queued, running, deltas, done; returns the deltas' text."""
    names = [e.event for e in events]
    assert names[:2] == ["queued", "running"] and names[-1] == "done", names
    assert set(names[2:-1]) <= {"delta"}, names
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids) and ids[0] == "queued" and ids[-1] == "end"
    deltas = [e.data for e in events if e.event == "delta"]
    done = events[-1].data
    assert done["status"] == "succeeded"
    usage = done["response"]["usage"]
    if deltas:
        assert deltas[-1]["completion_tokens"] == usage["completion_tokens"]
        counts = [d["completion_tokens"] for d in deltas]
        assert counts == sorted(counts)
    return "".join(d["text"] for d in deltas)


def test_job_events_deltas_add_up_to_the_result(stack: Stack) -> None:
    with stack.client() as client:
        job_id = submit(client, "tiny", "def main():", True, max_tokens=24)
        live = read_events(client, f"/v1/jobs/{job_id}/events")
        text = check_job_story(live)
        assert_same_text(live[-1].data["response"]["choices"][0]["text"], text)
        assert sum(e.event == "delta" for e in live) == 24  # one per step: no early stop here
        # A late connector gets the whole story again, same ids.
        late = read_events(client, f"/v1/jobs/{job_id}/events")
        assert [(e.event, e.id) for e in late] == [(e.event, e.id) for e in live]
        # Resuming after any event gives exactly the events after it.
        for k in (0, 1, 5, len(live) - 2):
            rest = read_events(client, f"/v1/jobs/{job_id}/events", last_event_id=live[k].id)
            assert [(e.event, e.id) for e in rest] == [(e.event, e.id) for e in live[k + 1 :]]
        assert read_events(client, f"/v1/jobs/{job_id}/events", last_event_id="end") == []
        bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "nope"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
        assert client.get("/v1/jobs/job_missing/events").status_code == 404


def test_resume_mid_stream_has_no_gap_or_repeat(stack: Stack) -> None:
    with stack.client() as client:
        job_id = submit(client, "tiny", "import os\n", True, max_tokens=120)
        first = read_events(client, f"/v1/jobs/{job_id}/events", stop_after=5)  # hang up
        rest = read_events(client, f"/v1/jobs/{job_id}/events", last_event_id=first[-1].id)
        whole = first + rest
        text = check_job_story(whole)
        assert_same_text(whole[-1].data["response"]["choices"][0]["text"], text)


def test_jobs_that_did_not_ask_publish_no_deltas(stack: Stack) -> None:
    with stack.client() as client:
        job_id = submit(client, "tiny", "def main():", False, max_tokens=8)
        events = read_events(client, f"/v1/jobs/{job_id}/events")
        assert [e.event for e in events] == ["queued", "running", "done"]
        # The body's own OpenAI field asks too; batch lines cannot (nothing reads them).
        resp = client.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "endpoint": "/v1/embeddings",
                "body": {"input": "x"},
                "stream": True,
            },
        )
        assert resp.status_code == 400 and resp.json()["error"]["param"] in ("stream", "endpoint")


def test_cancelled_queued_job_ends_with_error(stack: Stack) -> None:
    with stack.client() as client:
        job_id = submit(client, "idle", "never runs", True)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        events = read_events(client, f"/v1/jobs/{job_id}/events")
    assert [e.event for e in events] == ["queued", "error"]
    assert events[-1].data["error"]["code"] == "cancelled"
    assert events[-1].data["job"]["status"] == "cancelled"


def _batch(client: httpx.Client, n: int) -> str:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": f"x = {i}", "max_tokens": 2 + i % 5},
        }
        for i in range(n)
    ]
    lines.append(
        {**lines[0], "custom_id": "bad", "body": {"model": "tiny", "prompt": "word " * 400}}
    )
    data = "\n".join(json.dumps(x) for x in lines).encode()
    up = client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
    assert up.status_code == 200, up.text
    resp = client.post(
        "/v1/batches",
        json={
            "input_file_id": up.json()["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def test_batch_events_lines_in_completion_order_then_done(stack: Stack) -> None:
    with stack.client() as client:
        batch_id = _batch(client, 12)
        live = read_events(client, f"/v1/batches/{batch_id}/events")
        final = live[-1]
        assert final.event == "done" and final.id == "end"
        assert final.data["status"] == "completed"
        assert final.data["request_counts"] == {"total": 13, "completed": 12, "failed": 1}
        lines = [e.data for e in live if e.event == "line"]
        assert sorted(x["custom_id"] for x in lines) == sorted(
            [f"line-{i}" for i in range(12)] + ["bad"]
        )
        assert {x["custom_id"]: x["status"] for x in lines}["bad"] == "failed"
        progress = [e.data["request_counts"] for e in live if e.event == "progress"]
        assert progress[-1] == final.data["request_counts"]
        done = [c["completed"] + c["failed"] for c in progress]
        assert done == sorted(done)
        ids = [e.id for e in live]
        assert len(set(ids)) == len(ids)
        # A late connector sees the same lines in the same order; a resume, the rest.
        late = read_events(client, f"/v1/batches/{batch_id}/events")
        assert [e.data for e in late if e.event == "line"] == lines
        k = next(i for i, e in enumerate(late) if e.event == "line") + 4
        rest = read_events(client, f"/v1/batches/{batch_id}/events", last_event_id=late[k].id)
        assert [e.data for e in late[: k + 1] + rest if e.event == "line"] == lines
        assert rest[-1].event == "done"
        rows = {j.id: j.finished_at for j in stack.jobs(x["job_id"] for x in lines)}
        at = [rows[x["job_id"]] for x in lines]
        assert at == sorted(at)  # completion order


def test_stream_keys_expire(stack: Stack) -> None:
    import redis

    from lmqueue.contract import delta_stream_key
    from lmqueue.settings import Settings

    with stack.client() as client:
        job_id = submit(client, "tiny", "def main():", True, max_tokens=4)
        read_events(client, f"/v1/jobs/{job_id}/events")
    r = redis.Redis.from_url(stack.redis_url)
    key = delta_stream_key(job_id, Settings(queue_prefix=stack.queue_prefix))
    wait_until(lambda: r.exists(key), 10, "the delta stream")
    assert 0 < r.ttl(key) <= 3600 and r.xlen(key) == 4
    r.close()
