"""A rehearsal of `docker compose up` without a Docker engine (none runs on these machines).

What is real: the file itself (interpolated the way compose does, from a `.env` of test values,
then validated against the compose spec), each image's dependency set (the light venv is BUILT
from the light Dockerfile's requirement list and must not contain torch; the worker venv is the
test venv, CHECKED against the worker Dockerfile's list, extras included), every service's own
command line, environment and healthcheck, the Redis service's own command (password and all),
and the order compose enforces (migrate must exit 0 first).

What is mapped, because the services share one host here instead of one container each: the
hostnames `redis` and `postgres` (a private redis-server on a free port; a fresh database on the
machine's PostgreSQL, whose trust auth ignores the compose user and password), container ports
(8000, 5555, 9100, 9108 -> free ports), container paths (/app/.lmqueue, /models -> temp dirs),
and `lmqueue` (-> `python -m cli` in the image's venv, which is what the image's editable install
provides). Not rehearsed: the Docker build itself, the GPU reservation, Postgres' image, init.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cli.procs import Proc, free_port
from scripts.requirements import WORKER_EXTRAS, requirements

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
CACHE = Path(os.environ.get("LMQUEUE_TEST_CACHE", Path.home() / ".cache" / "lmqueue-tests"))
_VAR = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")
CONTAINER_PORTS = (8000, 5555, 9100, 9108)


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?error}, ${V?error}, $$."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$"
        name, op, arg = m.group(2), m.group(3), m.group(4) or ""
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and not value)
        if op in (":-", "-"):
            return arg if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        return value or ""

    return _VAR.sub(one, text)


def load(env: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    return data


def validate(config: dict[str, Any], tmp: Path) -> None:
    """The interpolated file against the compose spec vendored in check-jsonschema."""
    path = tmp / "compose.resolved.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)


# --- the images' venvs -------------------------------------------------------------------------


def light_venv() -> Path:
    """A venv with exactly what docker/light.Dockerfile installs, built once per requirement set
    (kept under the test cache: later runs reuse it)."""
    reqs = "\n".join(requirements(light=True)) + "\n"
    key = hashlib.sha256((reqs + sys.version).encode()).hexdigest()[:12]
    venv = CACHE / f"light-venv-{key}"
    if (venv / "ok").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / "requirements.txt").write_text(reqs)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        + ["-r", str(venv / "requirements.txt")],
        check=True,
    )
    (venv / "ok").write_text(reqs)
    return venv


def worker_venv_problems() -> list[str]:
    """What the test venv lacks of docker/worker.Dockerfile's requirement set (extras too)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    problems = []
    for line in requirements(light=False, extras=WORKER_EXTRAS):
        req = Requirement(line)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} does not satisfy {req.specifier}")
    return problems


def venv_size_mb(prefix: Path) -> float:
    total = sum(f.stat().st_size for f in prefix.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1e6


# --- services as processes ---------------------------------------------------------------------


@dataclass
class Host:
    """The one machine every container runs on in the rehearsal: its mappings."""

    tmp: Path
    redis_port: int
    database_url: str
    light: Path  # the light image's venv
    ports: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {p: free_port() for p in CONTAINER_PORTS}
        self.paths = {"/app/.lmqueue": self.tmp / "data", "/models": self.tmp / "models"}

    def map_text(self, value: str) -> str:
        value = re.sub(r"@redis:6379", f"@127.0.0.1:{self.redis_port}", value)
        if "@postgres:5432" in value:
            return self.database_url
        for container, host in self.paths.items():
            value = value.replace(container, str(host))
        for container_port, port in self.ports.items():
            value = re.sub(rf"(?<![0-9]){container_port}(?![0-9])", str(port), value)
        return value

    def python(self, service: Mapping[str, Any]) -> str:
        dockerfile = service.get("build", {}).get("dockerfile", "")
        return str(self.light / "bin" / "python") if "light" in dockerfile else sys.executable

    def argv(self, service: Mapping[str, Any], argv: list[str]) -> list[str]:
        python = self.python(service)
        mapped = [self.map_text(str(a)) for a in argv]
        if mapped[0] == "lmqueue":
            return [python, "-m", "cli", *mapped[1:]]
        if mapped[0] == "python":
            return [python, *mapped[1:]]
        return mapped

    def env(self, service: Mapping[str, Any], dotenv: Mapping[str, str]) -> dict[str, str]:
        env = dict(dotenv) if service.get("env_file") else {}
        environment = service.get("environment") or {}
        env.update({k: "" if v is None else str(v) for k, v in environment.items()})
        env = {k: self.map_text(v) for k, v in env.items()}
        python_bin = str(Path(self.python(service)).parent)
        env.update(
            {
                "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
                "PYTHONPATH": str(ROOT),  # the image's `pip install --no-deps -e .`
                "HOME": str(self.tmp / "home"),
                "PYTHONUNBUFFERED": "1",
                # Containers never share a default port; here they would: give each its own.
                "LMQUEUE_SCHEDULER_METRICS_PORT": env.get(
                    "LMQUEUE_SCHEDULER_METRICS_PORT", str(free_port())
                ),
            }
        )
        return env

    def start(self, name: str, service: Mapping[str, Any], dotenv: Mapping[str, str]) -> Proc:
        return Proc(
            name, self.argv(service, service["command"]), self.env(service, dotenv), self.tmp
        )

    def healthcheck(self, service: Mapping[str, Any], dotenv: Mapping[str, str]) -> bool:
        """The service's own compose healthcheck (CMD form), run with the service's env."""
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", test
        proc = subprocess.run(
            self.argv(service, test[1:]),
            env=self.env(service, dotenv),
            cwd=ROOT,
            capture_output=True,
            timeout=30,
        )
        return proc.returncode == 0


def redis_argv(service: Mapping[str, Any], host: Host) -> list[str]:
    """The redis service's own command, bound to loopback on the mapped port, data in tmp."""
    argv = [str(a) for a in service["command"]]
    return [*argv, "--port", str(host.redis_port), "--bind", "127.0.0.1", "--dir", str(host.tmp)]
