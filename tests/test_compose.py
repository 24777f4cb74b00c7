"""The Docker Compose stack, checked offline (no Docker engine here): the file validates against
the compose-spec schema vendored in check-jsonschema, every variable it reads is documented in
.env.example, the services are wired as intended, and the prestart step really migrates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from cli.procs import free_port
from lmqueue.readiness import head_revisions
from scripts.env_example import render
from scripts.requirements import WORKER_EXTRAS, WORKER_ONLY, dist_name, requirements

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
# ${VAR}, ${VAR:-default}, ${VAR:?message}; `$${VAR}` is an escape for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "LMQUEUE_FLOWER_BASIC_AUTH",
    "LMQUEUE_METRICS_KEY",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_file_matches_the_compose_spec() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_compose_variable_is_in_env_example() -> None:
    documented = {
        line.split("=", 1)[0] for line in render().splitlines() if line and line[0] != "#"
    }
    used = {m.group(1) for m in VARIABLE.finditer(COMPOSE.read_text())}
    assert used, "no variables found: the pattern is wrong"
    assert used <= documented, f"add to scripts/env_example.py: {sorted(used - documented)}"


def test_secrets_come_only_from_env_and_are_required() -> None:
    text_ = COMPOSE.read_text()
    for secret in SECRETS:
        uses = [m for m in VARIABLE.finditer(text_) if m.group(1) == secret]
        assert uses, f"{secret} is not used"
        assert all(m.group(2) == ":?" for m in uses), f"{secret} must be ${{{secret}:?...}}"
    assert "change-me" not in text_


def test_services_are_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {
        "redis",
        "postgres",
        "migrate",
        "api",
        "pool",
        "pool-cpu",
        "scheduler",
        "flower",
    }
    assert "--appendonly" in services["redis"]["command"]
    assert services["postgres"]["healthcheck"]["test"]
    assert services["migrate"]["command"] == ["sh", "scripts/prestart.sh"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "pool", "pool-cpu", "scheduler"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert services["scheduler"]["command"] == ["lmqueue", "scheduler"]
    # The light scheduler starts no workers (it has no torch): recovery, batches, metrics.
    assert services["scheduler"]["environment"]["LMQUEUE_SCHEDULER_BACKEND"] == "none"
    # Uploaded files on a volume; /metrics behind a key on the published API port.
    assert "lmqueue-data:/app/.lmqueue" in services["api"]["volumes"]
    assert services["api"]["environment"]["LMQUEUE_DATA_DIR"] == "/app/.lmqueue"
    assert "LMQUEUE_METRICS_KEY" in services["api"]["environment"]
    assert "--address" in services["flower"]["command"]


def test_the_pool_takes_every_gpu_and_has_a_cpu_variant(compose: dict[str, Any]) -> None:
    gpu, cpu = compose["services"]["pool"], compose["services"]["pool-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == "all", "the pool places one worker per GPU of the host"
    assert "deploy" not in cpu
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["command"] == cpu["command"] == ["lmqueue", "pool"]
    for service in compose["services"].values():  # no Docker socket: root on the host
        assert not any("docker.sock" in str(v) for v in service.get("volumes", []))


def test_images_exist_and_the_light_one_has_no_torch(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).exists(), name
    light = (ROOT / "docker" / "light.Dockerfile").read_text()
    assert "requirements.py --light" in light and "--no-deps" in light
    assert "torch" not in light.lower().replace("no torch", "")
    names = {dist_name(r) for r in requirements(light=True)}
    assert not names & WORKER_ONLY
    assert {dist_name(r) for r in requirements(light=False)} >= WORKER_ONLY
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert "--extras quant,gptq" in worker  # every documented model kind runs in the image
    quant = {dist_name(r) for r in requirements(light=False, extras=WORKER_EXTRAS)}
    assert {"bitsandbytes", "gptqmodel"} <= quant


def _prestart(database_url: str, wait_s: str = "60") -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "DATABASE_URL": database_url,
        "DB_WAIT_S": wait_s,
        "PYTHONPATH": str(ROOT),
        "HOME": str(ROOT),
    }
    return subprocess.run(
        ["sh", "scripts/prestart.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_prestart_migrates_to_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'prestart.db'}"
    proc = _prestart(url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    engine = create_engine(url)
    with engine.connect() as conn:
        have = {r[0] for r in conn.execute(text("select version_num from alembic_version"))}
    engine.dispose()
    assert have == set(head_revisions())


def test_prestart_fails_when_the_database_never_answers() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    proc = _prestart(url, wait_s="1")
    assert proc.returncode != 0
    assert "did not answer" in proc.stderr
