"""Admission control and request limits against a real API (auth on): too many open jobs per key or
per model is a 429 with Retry-After from the measured drain rate; oversized bodies are 413s,
with or without Content-Length; a timeout above the server's maximum is a 400."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from cli.procs import wait_until
from cli.stack import Stack, running
from lmqueue.admission import MAX_RETRY_S, NO_DRAIN_RETRY_S, retry_after_s
from lmqueue.tables import Job, JobStatus, new_id
from tests.auth_stack import as_key, auth_stack, create_key

pytestmark = pytest.mark.timeout(120)

PER_KEY, PER_MODEL, MAX_BODY = 3, 5, 20_000
# A model no other test uses: the limits and the drain rate count its jobs in the session's
# database, which other modules' "idle" jobs share.
IDLE = "limited"


@pytest.fixture(scope="module")
def limits_stack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    st = auth_stack(
        database_url,
        redis_url,
        tiny_model_dir,
        tmp_path_factory.mktemp("logs"),
        idle=IDLE,
        LMQUEUE_MAX_OPEN_JOBS_PER_KEY=str(PER_KEY),
        LMQUEUE_MAX_OPEN_JOBS_PER_MODEL=str(PER_MODEL),
        LMQUEUE_ADMISSION_CACHE_S="0.5",
        LMQUEUE_MAX_REQUEST_BYTES=str(MAX_BODY),
        LMQUEUE_MAX_JOB_TIMEOUT_S="100",
        LMQUEUE_METRICS_KEY=METRICS_KEY,
    )
    with running(st):
        yield st


METRICS_KEY = "scrape-secret-for-admission-tests"


def _job(prompt: str, model: str = IDLE, **extra: object) -> dict[str, object]:
    return {"model": model, "endpoint": "/v1/completions", "body": {"prompt": prompt}, **extra}


def _finished_jobs(limits_stack: Stack, model: str, n: int, seconds_ago: float) -> None:
    """Jobs that finished lately: what the drain rate is measured from."""
    t = time.time() - seconds_ago
    with Session(limits_stack.engine) as s:
        for _ in range(n):
            s.add(
                Job(
                    id=new_id("job"),
                    owner="someone-else",
                    model=model,
                    endpoint="/v1/completions",
                    body={},
                    status=JobStatus.SUCCEEDED,
                    priority=5,
                    created_at=t - 1,
                    finished_at=t,
                )
            )
        s.commit()


def test_open_job_limits_per_key_and_per_model(limits_stack: Stack) -> None:
    a, b = create_key(limits_stack, "a"), create_key(limits_stack, "b")
    with as_key(limits_stack, a) as alice, as_key(limits_stack, b) as bob:
        ids = [alice.post("/v1/jobs", json=_job(f"a{i}")).json()["id"] for i in range(PER_KEY)]
        full = alice.post("/v1/jobs", json=_job("one too many"))
        assert full.status_code == 429, full.text
        err = full.json()["error"]
        assert err["code"] == "rate_limit_exceeded"
        assert f"has {PER_KEY} jobs queued or running; the limit is {PER_KEY}" in err["message"]
        assert full.headers["retry-after"] == "60"  # nothing drained lately: ask in a minute

        # A retry of an accepted request is never refused: it creates nothing.
        idem = {"Idempotency-Key": "retry-me"}
        assert bob.post("/v1/jobs", json=_job("idem"), headers=idem).status_code == 202
        assert bob.post("/v1/jobs", json=_job("idem"), headers=idem).status_code == 200

        # Bob has room, the model has PER_MODEL - PER_KEY - 1 = 1 slot left.
        assert bob.post("/v1/jobs", json=_job("b1")).status_code == 202
        model_full = bob.post("/v1/jobs", json=_job("b2"))
        assert model_full.status_code == 429
        assert f"model '{IDLE}'" in model_full.json()["error"]["message"]
        assert model_full.json()["error"]["param"] == "model"

        # Another model is not affected by this one's open jobs.
        assert bob.post("/v1/jobs", json=_job("other", model="tiny")).status_code == 202

        # Room again once jobs finish (after the short count cache expires).
        assert alice.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
        wait_until(
            lambda: alice.post("/v1/jobs", json=_job("again")).status_code == 202,
            10,
            "a cancelled job to free a slot",
            every_s=0.2,
        )

        # Retry-After follows the measured drain rate: 30 jobs in the last minute = 0.5/s.
        _finished_jobs(limits_stack, IDLE, 30, seconds_ago=10)

        def paced() -> bool:
            resp = alice.post("/v1/jobs", json=_job("paced"))
            assert resp.status_code == 429, resp.text
            return resp.headers["retry-after"] == "2"  # 1 job over the limit at 0.5 jobs/s

        wait_until(paced, 10, "Retry-After to follow the drain rate", every_s=0.2)


def test_timeout_above_the_server_maximum_is_a_400(limits_stack: Stack) -> None:
    key = create_key(limits_stack, "timeouts")
    with as_key(limits_stack, key) as client:
        resp = client.post("/v1/jobs", json=_job("slow", model="tiny", timeout=101))
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "timeout"
        assert "at most 100 seconds" in resp.json()["error"]["message"]
        ok = client.post("/v1/jobs", json=_job("fine", model="tiny", timeout=50))
        assert ok.status_code == 202, ok.text
    (job,) = limits_stack.jobs([ok.json()["id"]])
    assert job.deadline_at is not None
    assert job.deadline_at - job.created_at == pytest.approx(50)


def test_oversized_bodies_get_413_with_and_without_content_length(limits_stack: Stack) -> None:
    key = create_key(limits_stack, "big")
    big = b'{"model": "tiny", "endpoint": "/v1/completions", "body": {"prompt": "' + (
        b"x" * (MAX_BODY + 10) + b'"}}'
    )
    with as_key(limits_stack, key) as client:
        sized = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
        assert sized.status_code == 413
        assert f"the limit is {MAX_BODY}" in sized.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
            for i in range(0, len(big), 4096):
                yield big[i : i + 4096]

        chunked = client.post(
            "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413, chunked.text
        assert f"limit of {MAX_BODY} bytes" in chunked.json()["error"]["message"]
        assert chunked.json()["error"]["code"] == "request_too_large"

        small = client.post("/v1/jobs", content=iter([b'{"model": "tiny"}']))
        assert small.status_code == 400  # read in full, then validated as usual


def test_429_is_counted_in_metrics(limits_stack: Stack) -> None:
    with as_key(limits_stack, METRICS_KEY) as prometheus:  # /metrics is behind a key
        text = prometheus.get("/metrics").text
    assert 'lmqueue_admission_rejections_total{limit="key"}' in text
    assert 'lmqueue_admission_rejections_total{limit="model"}' in text


@pytest.mark.parametrize(
    ("excess", "rate", "expected"),
    [(1, 0.0, NO_DRAIN_RETRY_S), (1, 0.5, 2), (10, 100.0, 1), (10**9, 0.01, MAX_RETRY_S)],
)
def test_retry_after(excess: int, rate: float, expected: int) -> None:
    assert retry_after_s(excess, rate) == expected
