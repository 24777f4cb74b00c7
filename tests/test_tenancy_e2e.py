"""Tenancy end to end: a live API (keys on) and a real Celery worker with the tiny model; keys
and their limits made by the real CLI. Fair share between two keys' batches, quotas and the
deadline check answered as 429s, file and output expiry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack, running
from lmqueue.tables import FileObject, Job, JobStatus, new_id, now
from tests.auth_stack import as_key, auth_stack, create_key, lmqueue_cli
from tests.tenancy_helpers import input_bytes

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
# Nothing serves it. Its own name: the deadline test counts the model's recent jobs in the
# session's database, where other modules' "idle" jobs would change the drain rate.
IDLE = "tenancy-idle"


@pytest.fixture(scope="module")
def tstack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    st = auth_stack(
        database_url,
        redis_url,
        tiny_model_dir,
        tmp_path_factory.mktemp("tenancy"),
        idle=IDLE,
        LMQUEUE_BATCH_DISPATCH_WINDOW="16",  # small, so the share shows with few lines
    )
    with running(st, ["tiny"]):
        yield st


def _upload(client: httpx.Client, data: bytes, **fields: str) -> httpx.Response:
    return client.post(
        "/v1/files",
        data={"purpose": "batch", **fields},
        files={"file": ("in.jsonl", data, "application/jsonl")},
    )


def _batch(client: httpx.Client, file_id: str, **extra: Any) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", **extra}
    return client.post("/v1/batches", json=body)


def _start(client: httpx.Client, n: int, prefix: str, model: str = "tiny") -> str:
    f = _upload(client, input_bytes(n, model, prefix))
    assert f.status_code == 200, f.text
    b = _batch(client, f.json()["id"])
    assert b.status_code == 200, b.text
    return str(b.json()["id"])


def test_small_batch_of_one_key_overtakes_a_large_one(tstack: Stack) -> None:
    a, b = as_key(tstack, create_key(tstack, "tenant-a")), as_key(tstack, create_key(tstack, "b"))
    big = _start(a, 160, "a")
    wait_until(lambda: a.get(f"/v1/batches/{big}").json()["status"] == "in_progress", 30, "a")
    small = _start(b, 16, "b")

    def small_done() -> dict[str, Any] | None:
        s = b.get(f"/v1/batches/{small}").json()
        return s if s["status"] == "completed" else None

    wait_until(small_done, 240, "the small batch", every_s=0.2)
    big_then = a.get(f"/v1/batches/{big}").json()["request_counts"]["completed"]
    # B waited for A's window (16 lines) and then shared: A was far from done.
    assert big_then < 160 * 0.6, big_then
    wait_until(
        lambda: a.get(f"/v1/batches/{big}").json()["status"] == "completed", 240, "the big one"
    )


def test_quotas_are_429_naming_the_quota(tstack: Stack) -> None:
    key = create_key(tstack, "quota")
    client = as_key(tstack, key)
    key_id = _key_id(tstack, key)
    proc = lmqueue_cli(tstack, "keys", "limits", key_id, "--queued-lines", "10")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quota_queued_lines"] == 10
    f = _upload(client, input_bytes(11, IDLE, "q")).json()
    refused = _batch(client, f["id"])
    assert refused.status_code == 429, refused.text
    err = refused.json()["error"]
    assert err["code"] == "quota_exceeded" and "quota_queued_lines" in err["message"]
    assert int(refused.headers["Retry-After"]) >= 1

    proc = lmqueue_cli(tstack, "keys", "limits", key_id, "--file-bytes", str(f["bytes"] + 10))
    assert proc.returncode == 0, proc.stderr
    too_much = _upload(client, input_bytes(11, IDLE, "q2"))
    assert too_much.status_code == 429, too_much.text
    assert "quota_file_bytes" in too_much.json()["error"]["message"]
    assert lmqueue_cli(tstack, "keys", "limits", key_id, "--file-bytes", "default").returncode == 0
    assert _upload(client, input_bytes(11, IDLE, "q3")).status_code == 200


def _key_id(stack: Stack, key: str) -> str:
    rows = json.loads(lmqueue_cli(stack, "keys", "list", "--json").stdout)
    return str(next(r["id"] for r in rows if key.startswith(r["prefix"])))


def test_deadline_admission_names_the_earliest_window(tstack: Stack) -> None:
    client = as_key(tstack, create_key(tstack, "deadline"))
    t = now()
    drained = [new_id("job") for _ in range(60)]
    with Session(tstack.engine) as s:  # IDLE drained 60 lines in the last minute: 1 line/s
        for i, job_id in enumerate(drained):
            s.add(
                Job(
                    id=job_id,
                    model=IDLE,
                    endpoint="/v1/completions",
                    body={},
                    status=JobStatus.SUCCEEDED,
                    finished_at=t - i,
                )
            )
        s.commit()
    try:
        f = _upload(client, input_bytes(200, IDLE, "d")).json()
        refused = _batch(client, f["id"], completion_window="1m")
        assert refused.status_code == 429, refused.text
        err = refused.json()["error"]
        assert err["code"] == "deadline_infeasible" and err["param"] == "completion_window"
        assert "earliest feasible completion_window is" in err["message"]
        accepted = _batch(client, f["id"], completion_window="24h")
        assert accepted.status_code == 200, accepted.text
        # Nothing serves IDLE: cancel, so its lines hold no dispatch window (the database is
        # shared with the other test modules of this session).
        cancel = client.post(f"/v1/batches/{accepted.json()['id']}/cancel")
        assert cancel.status_code == 200, cancel.text
    finally:
        with Session(tstack.engine) as s:
            s.execute(delete(Job).where(Job.id.in_(drained)))
            s.commit()


def test_expiry_of_files_and_outputs(tstack: Stack) -> None:
    client = as_key(tstack, create_key(tstack, "expiry"))
    bad = _upload(
        client, b"{}\n", **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "10"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_after.seconds"
    f = _upload(
        client,
        input_bytes(3, "tiny", "e"),
        **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    ).json()
    assert f["expires_at"] - f["created_at"] == 3600
    bad = _batch(client, f["id"], output_expires_after={"anchor": "created_at", "seconds": 5})
    assert bad.status_code == 400 and "output_expires_after" in bad.json()["error"]["param"]
    b = _batch(client, f["id"], output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert b.status_code == 200, b.text

    def done() -> dict[str, Any] | None:
        got = client.get(f"/v1/batches/{b.json()['id']}").json()
        return got if got["status"] == "completed" else None

    batch = wait_until(done, 120, "the batch", every_s=0.2)
    out = client.get(f"/v1/files/{batch['output_file_id']}").json()
    assert 7190 <= out["expires_at"] - out["created_at"] <= 7200

    with Session(tstack.engine) as s:  # time passes: the input file's expiry is behind us
        s.execute(update(FileObject).where(FileObject.id == f["id"]).values(expires_at=now() - 1))
        s.commit()
    gone = client.get(f"/v1/files/{f['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_expired"
    assert client.get(f"/v1/files/{f['id']}/content").status_code == 404
    again = _batch(client, f["id"])
    assert again.status_code == 404 and again.json()["error"]["code"] == "file_expired"
    assert f["id"] not in {x["id"] for x in client.get("/v1/files").json()["data"]}
