"""`docker compose up` rehearsed without Docker (see tests/compose_rehearsal.py for what is real
and what is mapped): every service of the cpu profile runs its own command from the file, a job
and a 100-line batch go through on two models, the pool scales up under the backlog and back to
zero, and no service exits on its way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cli.procs import Proc, wait_until
from lmqueue.settings import Settings
from lmqueue.tables import WorkerRecord
from tests.compose_rehearsal import (
    COMPOSE,
    ROOT,
    Host,
    MissingVariable,
    interpolate,
    light_venv,
    load,
    redis_argv,
    validate,
    worker_venv_problems,
)
from tests.postgres import fresh_postgres_database

# The .env a user writes from .env.example: secrets as test values, two models, the cpu pool.
DOTENV = {
    "POSTGRES_PASSWORD": "pg-test-secret",
    "REDIS_PASSWORD": "redis-test-secret",
    "LMQUEUE_FLOWER_BASIC_AUTH": "ops:flower-test-secret",
    "LMQUEUE_METRICS_KEY": "metrics-test-secret",
    "LMQUEUE_MODELS": "demo=/models/demo,other=/models/demo",
    "COMPOSE_PROFILES": "cpu",
    "HF_HUB_OFFLINE": "1",
    "LMQUEUE_POOL_CPU_WORKERS": "2",
    "LMQUEUE_MAX_BATCH_SIZE": "8",
    "LMQUEUE_HEARTBEAT_S": "1",
    "LMQUEUE_SCHEDULER_INTERVAL_S": "0.5",
    "LMQUEUE_SCHEDULER_UPSCALE_DELAY_S": "0",
    "LMQUEUE_SCHEDULER_DOWNSCALE_DELAY_S": "3",
    "TOKENIZERS_PARALLELISM": "false",
}
REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?")


def test_interpolation_like_compose() -> None:
    env = {"A": "a", "E": ""}
    assert interpolate("${A} ${E:-d} ${E-d} ${U:-d} $${A}", env) == "a d  d ${A}"
    with pytest.raises(MissingVariable, match="E: say"):
        interpolate("${E:?say}", env)


def test_every_required_secret_is_documented_and_env_example_parses() -> None:
    required = set(REQUIRED.findall(COMPOSE.read_text()))
    assert required >= {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "LMQUEUE_METRICS_KEY"}
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in required:
        assert f"\n{name}=" in example, f"{name} missing from .env.example"
        assert name in readme, f"{name} is required by docker-compose.yml: say so in README"
    Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]  # every line parses
    with pytest.raises(MissingVariable):
        load({k: v for k, v in DOTENV.items() if k != "REDIS_PASSWORD"})


def test_the_worker_venv_has_the_worker_image_dependencies() -> None:
    assert worker_venv_problems() == []
    # The quantization kernels import here (bnb-int8/nf4 and gptq models can start).
    subprocess.run(
        [sys.executable, "-c", "import bitsandbytes, gptqmodel"], check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("compose")
    with fresh_postgres_database() as database_url:
        t = time.monotonic()
        venv = light_venv()
        print(f"\nlight venv ready in {time.monotonic() - t:.1f}s: {venv}")
        h = Host(tmp, 0, database_url, venv)
        from cli.procs import free_port

        h.redis_port = free_port()
        (tmp / "models").mkdir()
        (tmp / "models" / "demo").symlink_to(tiny_model_dir)
        (tmp / "home").mkdir()
        yield h


def _alive(procs: dict[str, Proc]) -> None:
    for name, proc in procs.items():
        if not proc.alive():
            raise AssertionError(f"service {name} exited ({proc.popen.returncode}):\n{proc.tail()}")


def _live_workers(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            rows = s.scalars(select(WorkerRecord).where(WorkerRecord.status == "up")).all()
            fresh = [w for w in rows if w.heartbeat_at > time.time() - 5]
    finally:
        engine.dispose()
    counts: dict[str, int] = {}
    for w in fresh:
        counts[w.model] = counts.get(w.model, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compose_up_rehearsal(host: Host) -> None:
    started = time.monotonic()
    light = host.light / "bin" / "python"
    assert subprocess.run([str(light), "-c", "import torch"], capture_output=True).returncode
    config = load(DOTENV)
    validate(config, host.tmp)
    services = {
        n: s
        for n, s in config["services"].items()
        if not s.get("profiles") or DOTENV["COMPOSE_PROFILES"] in s["profiles"]
    }
    assert set(services) == {
        "redis",
        "postgres",
        "migrate",
        "api",
        "scheduler",
        "pool-cpu",
        "flower",
    }
    procs: dict[str, Proc] = {}
    try:
        procs["redis"] = Proc("redis", redis_argv(services["redis"], host), {}, host.tmp)
        wait_until(
            lambda: (
                subprocess.run(
                    [
                        "redis-cli",
                        "-p",
                        str(host.redis_port),
                        "-a",
                        DOTENV["REDIS_PASSWORD"],
                        "ping",
                    ],
                    capture_output=True,
                ).stdout.strip()
                == b"PONG"
            ),
            30,
            "redis to answer with its password",
        )
        migrate = host.start("migrate", services["migrate"], DOTENV)
        assert migrate.popen.wait(180) == 0, migrate.tail()
        for name in ("api", "scheduler", "pool-cpu", "flower"):
            procs[name] = host.start(name, services[name], DOTENV)
        wait_until(
            lambda: _alive(procs) or host.healthcheck(services["api"], DOTENV),
            120,
            "the api's own healthcheck",
        )
        wait_until(
            lambda: _alive(procs) or host.healthcheck(services["pool-cpu"], DOTENV),
            300,
            "the pool's own healthcheck (its template imported)",
        )
        up_s = time.monotonic() - started
        key = _admin_key(host, services["api"])
        base = f"http://127.0.0.1:{host.ports[8000]}"
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as api:
            seen = _one_job_and_a_batch(api, procs, host.database_url)
            assert seen == {"demo", "other"}, "the pool gives every configured model workers"
            metrics = httpx.get(f"{base}/metrics", timeout=10)
            assert metrics.status_code == 401
            scrape = httpx.get(
                f"{base}/metrics",
                headers={"Authorization": f"Bearer {DOTENV['LMQUEUE_METRICS_KEY']}"},
                timeout=10,
            )
            assert scrape.status_code == 200
        uploads = list((host.tmp / "data").rglob("*"))
        assert any(p.is_file() for p in uploads), "uploads live on the data volume"
        try:
            wait_until(
                lambda: _alive(procs) or not _live_workers(host.database_url),
                300,
                "the pool to scale back to zero",
            )
        except TimeoutError as exc:
            live = _live_workers(host.database_url)
            raise AssertionError(f"{exc}: live {live}\n{procs['pool-cpu'].tail(80)}") from exc
        flower = httpx.get(
            f"http://127.0.0.1:{host.ports[5555]}/", auth=("ops", "flower-test-secret"), timeout=10
        )
        assert flower.status_code == 200
        _alive(procs)
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop(timeout_s=60)
    assert procs["pool-cpu"].popen.returncode == 0, procs["pool-cpu"].tail()
    print(
        f"\ncompose rehearsal: services up and healthy {up_s:.1f}s; "
        f"whole run {time.monotonic() - started:.1f}s"
    )


def _admin_key(host: Host, api: dict[str, Any]) -> str:
    """`docker compose exec api lmqueue keys create --admin`."""
    out = subprocess.run(
        host.argv(api, ["lmqueue", "keys", "create", "--admin", "--name", "ops"]),
        env=host.env(api, DOTENV),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return out.strip().splitlines()[0]  # stdout carries the key alone


def _one_job_and_a_batch(api: httpx.Client, procs: dict[str, Proc], db: str) -> set[str]:
    """Returns the models the pool was seen running workers for meanwhile."""
    resp = api.post(
        "/v1/jobs",
        json={
            "model": "demo",
            "endpoint": "/v1/completions",
            "body": {"prompt": "hello", "max_tokens": 3},
        },
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "other", "prompt": f"line {i}", "max_tokens": 2},
            }
        )
        + "\n"
        for i in range(100)
    )
    upload = api.post(
        "/v1/files", files={"file": ("in.jsonl", lines.encode())}, data={"purpose": "batch"}
    )
    assert upload.status_code == 200, upload.text
    batch = api.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]

    seen: set[str] = set()

    def done() -> bool:
        _alive(procs)
        seen.update(_live_workers(db))
        job = api.get(f"/v1/jobs/{job_id}").json()
        b = api.get(f"/v1/batches/{batch_id}").json()
        return job["status"] == "succeeded" and b["status"] == "completed"

    wait_until(done, 400, "the job and the 100-line batch", every_s=1)
    assert api.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] == 100
    return seen
