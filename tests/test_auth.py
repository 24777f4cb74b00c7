"""API keys and tenant isolation, against a real API with auth on (keys made by the real CLI).

Isolation is table-driven (OWNED): each kind of owned object (job, file, batch) says how to
create one and which requests must not reach another key's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli.procs import Proc, free_port, python_argv, wait_until
from cli.stack import Stack, running
from lmqueue.exposure import api_problems, flower_problems, is_loopback
from lmqueue.settings import Settings
from tests.auth_stack import as_key, auth_stack, create_key, lmqueue_cli

pytestmark = pytest.mark.timeout(120)
METRICS_KEY = "scrape-secret-for-tests"


@pytest.fixture(scope="module")
def keyed_stack(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    db = f"sqlite:///{tmp_path_factory.mktemp('auth') / 'lmqueue.db'}"
    st = auth_stack(
        db,
        redis_url,
        tiny_model_dir,
        tmp_path_factory.mktemp("logs"),
        LMQUEUE_METRICS_KEY=METRICS_KEY,
    )
    with running(st):
        yield st


@pytest.fixture(scope="module")
def keys(keyed_stack: Stack) -> dict[str, str]:
    return {
        "a": create_key(keyed_stack, "alice"),
        "b": create_key(keyed_stack, "bob"),
        "admin": create_key(keyed_stack, "ops", admin=True),
    }


# --- isolation, table-driven ------------------------------------------------------------------


@dataclass
class Owned:
    kind: str
    create: Callable[[httpx.Client], str]  # makes one object as the client's key; returns its id
    reads: list[tuple[str, str]]  # (method, path with {id}) another key must get 404 on
    listing: str  # list endpoint whose `data` must not show another key's objects


def _create_job(client: httpx.Client) -> str:
    resp = client.post(
        "/v1/jobs",
        json={"model": "idle", "endpoint": "/v1/completions", "body": {"prompt": "mine"}},
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


BATCH_LINE = {
    "custom_id": "only",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"model": "idle", "prompt": "mine", "max_tokens": 1},
}


def _upload(client: httpx.Client) -> str:
    content = (json.dumps(BATCH_LINE) + "\n").encode()
    resp = client.post(
        "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def _create_batch(client: httpx.Client) -> str:
    resp = client.post(
        "/v1/batches",
        json={
            "input_file_id": _upload(client),
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


OWNED = [
    Owned(
        "job",
        _create_job,
        [
            ("GET", "/v1/jobs/{id}"),
            ("GET", "/v1/jobs/{id}?wait=1"),
            ("POST", "/v1/jobs/{id}/cancel"),
        ],
        "/v1/jobs",
    ),
    Owned(
        "file",
        _upload,
        [
            ("GET", "/v1/files/{id}"),
            ("GET", "/v1/files/{id}/content"),
            ("DELETE", "/v1/files/{id}"),
        ],
        "/v1/files",
    ),
    Owned(
        "batch",
        _create_batch,
        [
            ("GET", "/v1/batches/{id}"),
            ("GET", "/v1/batches/{id}/results"),
            ("POST", "/v1/batches/{id}/cancel"),
            ("POST", "/v1/batches/{id}/retry_failed"),
        ],
        "/v1/batches",
    ),
]


@pytest.mark.parametrize("owned", OWNED, ids=lambda o: o.kind)
def test_another_key_cannot_see_read_or_cancel(
    keyed_stack: Stack, keys: dict[str, str], owned: Owned
) -> None:
    with as_key(keyed_stack, keys["a"]) as alice, as_key(keyed_stack, keys["b"]) as bob:
        object_id = owned.create(alice)
        for method, path in owned.reads:
            resp = bob.request(method, path.format(id=object_id))
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "not_found"
        assert object_id not in {o["id"] for o in bob.get(owned.listing).json()["data"]}
        # The owner still sees it, untouched by the other key's attempts.
        for method, path in owned.reads:
            if method == "GET":
                assert alice.get(path.format(id=object_id)).status_code == 200
        assert object_id in {o["id"] for o in alice.get(owned.listing).json()["data"]}


def test_the_same_idempotency_key_is_private_to_each_api_key(
    keyed_stack: Stack, keys: dict[str, str]
) -> None:
    req = {"model": "idle", "endpoint": "/v1/completions", "body": {"prompt": "idem"}}
    header = {"Idempotency-Key": "shared-name"}
    with as_key(keyed_stack, keys["a"]) as alice, as_key(keyed_stack, keys["b"]) as bob:
        a = alice.post("/v1/jobs", json=req, headers=header)
        b = bob.post("/v1/jobs", json=req, headers=header)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer lmq_not-a-real-key"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
    ],
)
def test_requests_without_a_valid_key_get_401(
    keyed_stack: Stack, headers: dict[str, str], code: str
) -> None:
    with keyed_stack.client(headers=headers) as client:
        for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/jobs")]:
            resp = client.request(method, path, json={} if method == "POST" else None)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"]["code"] == code
            assert resp.headers["www-authenticate"] == "Bearer"
        # Probes stay open: a load balancer has no key.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_revoked_key_is_refused_and_listed_as_revoked(keyed_stack: Stack) -> None:
    key = create_key(keyed_stack, "short-lived")
    with as_key(keyed_stack, key) as client:
        assert client.get("/v1/jobs").status_code == 200
        listed = lmqueue_cli(keyed_stack, "keys", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert key not in listed.stdout, "the secret must never be listed"
        (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "short-lived"]
        revoked = lmqueue_cli(keyed_stack, "keys", "revoke", row["id"])
        assert revoked.returncode == 0, revoked.stderr
        resp = client.get("/v1/jobs")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert lmqueue_cli(keyed_stack, "keys", "revoke", "key_nope").returncode == 1


def test_admin_endpoints_need_the_admin_scope(keyed_stack: Stack, keys: dict[str, str]) -> None:
    with as_key(keyed_stack, keys["a"]) as user:
        resp = user.get("/v1/admin/keys")
        assert resp.status_code == 403
        assert resp.json()["error"]["type"] == "permission_error"
        assert user.post("/v1/admin/keys", json={"name": "x"}).status_code == 403
        assert user.get("/v1/scheduler").status_code == 403
    with as_key(keyed_stack, keys["admin"]) as admin:
        assert admin.get("/v1/scheduler").status_code == 200
        made = admin.post("/v1/admin/keys", json={"name": "via-api"})
        assert made.status_code == 201, made.text
        new_key, new_id = made.json()["key"], made.json()["id"]
        assert made.json()["scopes"] == ["user"]
        listing = admin.get("/v1/admin/keys").json()["data"]
        assert new_id in {k["id"] for k in listing}
        assert all("key" not in k for k in listing), "only the create response carries a key"
        with as_key(keyed_stack, new_key) as fresh:
            assert fresh.get("/v1/jobs").status_code == 200
            assert admin.delete(f"/v1/admin/keys/{new_id}").json()["revoked_at"]
            assert fresh.get("/v1/jobs").status_code == 401
        assert admin.delete("/v1/admin/keys/key_nope").status_code == 404


def test_metrics_need_the_metrics_key_or_an_admin_key(
    keyed_stack: Stack, keys: dict[str, str]
) -> None:
    assert httpx.get(f"{keyed_stack.base_url}/metrics").status_code == 401
    with as_key(keyed_stack, keys["a"]) as user:
        assert user.get("/metrics").status_code == 403
    with as_key(keyed_stack, keys["admin"]) as admin:
        assert admin.get("/metrics").status_code == 200
    with as_key(keyed_stack, METRICS_KEY) as prometheus:
        resp = prometheus.get("/metrics")
        assert resp.status_code == 200 and "lmqueue_queue_depth" in resp.text


# --- refusing to expose an unprotected service ------------------------------------------------


def test_exposure_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("api.internal")
    local = Settings(auth_enabled=False, api_host="127.0.0.1")
    assert api_problems(local) == []
    assert "auth is off" in api_problems(Settings(auth_enabled=False, api_host="0.0.0.0"))[0]
    placeholder = Settings(api_host="0.0.0.0", database_url="postgresql+psycopg://u:change-me@db/x")
    assert api_problems(placeholder) == ["DATABASE_URL uses a placeholder password"]
    good = Settings(
        api_host="0.0.0.0",
        database_url="postgresql+psycopg://u:4f9c2e7a1b@db/x",
        flower_basic_auth="ops:4f9c2e7a1b",
    )
    assert api_problems(good) == []
    assert flower_problems(Settings(flower_basic_auth="admin:change-me"), "0.0.0.0")
    assert flower_problems(Settings(flower_basic_auth=""), "0.0.0.0")
    assert flower_problems(Settings(flower_basic_auth=""), "127.0.0.1") == []


def test_api_refuses_a_public_bind_with_auth_off(keyed_stack: Stack) -> None:
    env = {**keyed_stack.env, "LMQUEUE_AUTH_ENABLED": "false"}
    cli = lmqueue_cli(keyed_stack, "api", "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert cli.returncode == 2
    assert "refusing to start the API" in cli.stderr and "auth is off" in cli.stderr
    # The app itself re-checks at startup (uvicorn started directly, told the bind address).
    env["LMQUEUE_API_HOST"] = "0.0.0.0"
    argv = python_argv("-m", "uvicorn", "api.app:app", "--host", "127.0.0.1")
    proc = Proc("api-refused", [*argv, "--port", str(free_port())], env, keyed_stack.log_dir)
    wait_until(lambda: not proc.alive(), 60, "the API to refuse to start")
    assert proc.popen.returncode != 0
    assert "auth is off" in proc.log_path.read_text()


def test_flower_refuses_a_public_bind_with_a_placeholder_password(keyed_stack: Stack) -> None:
    env = {"LMQUEUE_FLOWER_BASIC_AUTH": "admin:change-me"}
    port = str(free_port())
    proc = lmqueue_cli(keyed_stack, "flower", "--address", "0.0.0.0", "--port", port, env=env)
    assert proc.returncode == 2
    assert "placeholder" in proc.stderr
