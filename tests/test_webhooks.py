"""Signed webhooks, end to end: API + worker + scheduler (which delivers) + a real loopback
receiver that verifies every delivery with the `standardwebhooks` library."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from cli.procs import wait_until
from cli.stack import Stack, running
from cli.webhook_receiver import Receiver, receiver
from lmqueue.webhooks.targets import BadTarget, check_target
from tests.batch_client import create, sdk, wait_done
from tests.batch_client import line as batch_line

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hook_stack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    st = Stack(
        database_url,
        redis_url,
        {"tiny": tiny_model_dir},
        tmp_path_factory.mktemp("hooks"),
        extra_env={
            "LMQUEUE_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",  # the receiver is on loopback
            "LMQUEUE_WEBHOOK_BACKOFF_S": "0.3",
            "LMQUEUE_WEBHOOK_POLL_S": "0.1",
            "LMQUEUE_SCHEDULER_BACKEND": "none",  # it only reaps, advances batches and delivers
            "LMQUEUE_SCHEDULER_INTERVAL_S": "0.2",
        },
    )
    with running(st, ("tiny",)):
        st.start_scheduler()
        yield st


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def register(client: httpx.Client, url: str, **body: object) -> dict[str, str]:
    resp = client.post("/v1/webhook_endpoints", json={"url": url, **body})
    assert resp.status_code == 200, resp.text
    ep: dict[str, str] = resp.json()
    assert ep["secret"].startswith("whsec_")
    return ep


def verified(secret: str, got: object) -> dict[str, object]:
    out: dict[str, object] = Webhook(secret).verify(got.body, got.headers)  # type: ignore[attr-defined]
    return out


def test_job_event_signed_and_verified(hook_stack: Stack, rx: Receiver) -> None:
    with hook_stack.client() as client:
        ep = register(client, rx.url, events=["job.succeeded", "job.failed"])
        job_id = hook_stack.submit(client, "tiny", "def webhook():", max_tokens=4)
        hook_stack.wait_job(client, job_id)
        wait_until(lambda: rx.of_type("job.succeeded"), 60, "the job.succeeded delivery")
        got = rx.of_type("job.succeeded")[0]
        event = verified(ep["secret"], got)
        assert event["type"] == "job.succeeded"
        assert event["data"]["id"] == job_id  # type: ignore[index]
        assert got.headers["webhook-id"] == event["id"]
        # A tampered body or another secret does not verify.
        with pytest.raises(WebhookVerificationError):
            Webhook(ep["secret"]).verify(got.body.replace("succeeded", "failed"), got.headers)
        client.delete(f"/v1/webhook_endpoints/{ep['id']}")


def test_retries_keep_the_webhook_id_and_every_attempt_is_recorded(
    hook_stack: Stack, rx: Receiver
) -> None:
    rx.plan = [500, 503]  # two failures, then 200
    with hook_stack.client() as client:
        ep = register(client, rx.url, events=["job.succeeded"])
        hook_stack.wait_job(client, hook_stack.submit(client, "tiny", "def retry():", max_tokens=3))
        wait_until(lambda: len(rx.got) >= 3, 60, "three attempts")
        ids = {r.headers["webhook-id"] for r in rx.got}
        assert len(ids) == 1, ids
        for r in rx.got:
            verified(ep["secret"], r)  # every attempt is signed afresh

        def delivered() -> dict[str, object] | None:
            page = client.get(f"/v1/webhook_endpoints/{ep['id']}/deliveries").json()
            d = page["data"][0]
            return d if d["status"] == "delivered" else None

        d = wait_until(delivered, 30, "the delivery to be marked delivered")
        assert d["id"] in ids
        assert [a["status_code"] for a in d["attempts"]] == [500, 503, 200]  # type: ignore[index]
        assert d["attempts"][0]["error"] == "HTTP 500"  # type: ignore[index]
        client.delete(f"/v1/webhook_endpoints/{ep['id']}")


def test_batch_completed_event_and_rotated_secret(hook_stack: Stack, rx: Receiver) -> None:
    with hook_stack.client() as client:
        ep = register(client, rx.url, events=["batch.completed", "batch.cancelled"])
        first = ep["secret"]
        # Rotated twice: the first secret is dropped at once (expire_previous_in 0); the second
        # keeps signing for the default grace beside the newest.
        url = f"/v1/webhook_endpoints/{ep['id']}/rotate_secret"
        bad = client.post(url, json={"expire_previous_in": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "expire_previous_in"
        second = client.post(url, json={"expire_previous_in": 0}).json()
        assert second["secret"] != first and "previous_secret_expires_at" not in second
        rotated = client.post(url).json()
        assert rotated["previous_secret_expires_at"] > time.time() + 23 * 3600
        listed = client.get("/v1/webhook_endpoints").json()["data"]
        assert ep["id"] in [e["id"] for e in listed]
        assert all("secret" not in e for e in listed)  # shown only when created or rotated
        oa = sdk(hook_stack)
        batch = create(oa, [batch_line(f"l{i}", prompt=f"x = {i}") for i in range(3)])
        done = wait_done(oa, batch.id)
        assert done.status == "completed"
        wait_until(lambda: rx.of_type("batch.completed"), 60, "the batch.completed delivery")
        got = rx.of_type("batch.completed")[0]
        event = verified(rotated["secret"], got)
        assert event["data"]["id"] == batch.id  # type: ignore[index]
        assert event["data"]["request_counts"]["completed"] == 3  # type: ignore[index]
        assert verified(second["secret"], got) == event  # still in its grace
        with pytest.raises(WebhookVerificationError):
            Webhook(first).verify(got.body, got.headers)
        print(f"batch.completed delivered {got.at - done.completed_at:.2f}s after completed_at")
        client.delete(f"/v1/webhook_endpoints/{ep['id']}")
        assert client.get(f"/v1/webhook_endpoints/{ep['id']}").status_code == 404


def test_bad_endpoints_are_refused_by_name(hook_stack: Stack) -> None:
    with hook_stack.client() as client:
        for body, param in (
            ({"url": "ftp://example.com/x"}, "url"),
            ({"url": "http://127.0.0.1:1/x", "events": ["job.exploded"]}, "events"),
            ({"url": "http://127.0.0.1:1/x", "events": []}, "events"),
        ):
            resp = client.post("/v1/webhook_endpoints", json=body)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://localhost/x",
        "http://10.1.2.3/x",
        "http://192.168.0.10/x",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0.0.0.0/x",
    ],
)
def test_private_targets_refused_unless_allowed(url: str) -> None:
    with pytest.raises(BadTarget):
        check_target(url, allow_private=False)
    check_target(url, allow_private=True)


def test_public_target_passes() -> None:
    check_target("https://93.184.216.34/hook", allow_private=False)  # an IP literal: no DNS
    with pytest.raises(BadTarget):
        check_target("https://user:pw@93.184.216.34/hook", allow_private=False)


def test_payload_is_the_signed_bytes() -> None:
    from lmqueue.webhooks.deliver import signed_headers

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}})
    headers = signed_headers([secret], "msg_1", body, 1_700_000_000)
    wh = Webhook(secret)
    with pytest.raises(WebhookVerificationError):
        wh.verify(body, headers)  # too old: the library checks the timestamp's age
    fresh = signed_headers([secret], "msg_1", body, __import__("time").time())
    assert wh.verify(body, fresh)["data"]["id"] == "job_1"


def test_during_a_rotation_both_secrets_sign_and_either_verifies() -> None:
    from lmqueue.webhooks.deliver import signed_headers
    from lmqueue.webhooks.endpoints import new_secret

    old, new = new_secret(), new_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}})
    headers = signed_headers([new, old], "msg_1", body, __import__("time").time())
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers)["data"]["id"] == "job_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_the_previous_secret_signs_until_its_grace_ends() -> None:
    from lmqueue.tables import WebhookEndpoint
    from lmqueue.webhooks.endpoints import rotate_secret, signing_secrets

    ep = WebhookEndpoint(secret="whsec_first")
    rotate_secret(ep, grace_s=60)
    t = time.time()
    assert signing_secrets(ep, t) == [ep.secret, "whsec_first"]
    assert signing_secrets(ep, t + 61) == [ep.secret]  # the grace is over
    second = ep.secret
    rotate_secret(ep, grace_s=0)
    assert signing_secrets(ep, t) == [ep.secret] and ep.secret != second
