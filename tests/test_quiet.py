"""A quiet first run: 1,000 jobs through `lmqueue up` print fewer than 50 console lines (one per
process start, the periodic summary, problems), and `--verbose` brings the detail back."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from cli.procs import Proc, free_port, python_argv, wait_until
from tests.test_supervision import up_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 1000


def _batch_file(n: int) -> bytes:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "temperature": 0}
    lines = (
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions", "body": body}
        for i in range(n)
    )
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_a_thousand_jobs_print_fewer_than_fifty_lines(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    env = {**up_env(tmp_path, redis_url, tiny_model_dir), "LMQUEUE_SUMMARY_INTERVAL_S": "5"}
    port = free_port()
    up = Proc("up", python_argv("-m", "cli", "up", "--port", str(port)), env, tmp_path)
    try:

        def worker_ready() -> bool:
            if not up.alive():
                raise RuntimeError(f"lmqueue up exited:\n{up.tail()}")
            return " ready: model tiny" in up.log_path.read_text(errors="replace")

        wait_until(worker_ready, 240, "the stack and its worker")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            singles = [
                client.post(
                    "/v1/jobs",
                    json={"model": "tiny", "endpoint": "/v1/completions", "body": {"prompt": "x"}},
                )
                for _ in range(10)
            ]
            assert all(r.status_code == 202 for r in singles)
            f = client.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", _batch_file(JOBS - 10))},
            ).json()
            batch = client.post(
                "/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions"}
            ).json()

            def completed() -> bool:
                b = client.get(f"/v1/batches/{batch['id']}").json()
                return bool(b["status"] == "completed")

            wait_until(completed, 400, f"{JOBS} jobs to run", every_s=1)
        wait_until(
            lambda: "jobs/s" in up.log_path.read_text(errors="replace"),
            30,
            "the scheduler's summary line",
        )
        os.kill(up.pid, signal.SIGTERM)
        up.popen.wait(90)
    finally:
        up.kill_group()
        if up.alive():
            up.kill()
    out = up.log_path.read_text(errors="replace")
    lines = [x for x in out.splitlines() if x.strip()]
    print(f"{JOBS} jobs through `lmqueue up`: {len(lines)} console lines\n" + out)
    assert len(lines) < 50, out
    assert "lmqueue is up" in out and "jobs/s" in out
    assert "Traceback" not in out and "INFO:" not in out  # no uvicorn access lines
