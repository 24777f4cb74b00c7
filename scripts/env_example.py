"""Print .env.example from the Settings class, so it always lists every variable with its default.

Usage: python scripts/env_example.py > .env.example
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmqueue.settings import Settings  # noqa: E402


def env_names(name: str, field: object) -> str:
    alias = getattr(field, "validation_alias", None)
    choices = getattr(alias, "choices", None)
    return str(choices[0]) if choices else f"LMQUEUE_{name.upper()}"


# Read by `docker compose` only (docker-compose.yml interpolates them), never by lmqueue itself.
# Passwords end up in URLs: use URL-safe ones (e.g. `openssl rand -hex 24`).
COMPOSE_ONLY: dict[str, tuple[str, str]] = {
    "COMPOSE_PROFILES": ("cpu", "which worker `docker compose up` starts: cpu, or gpu (NVIDIA)"),
    "POSTGRES_USER": ("lmqueue", ""),
    "POSTGRES_PASSWORD": ("", "required, URL-safe"),
    "POSTGRES_DB": ("lmqueue", ""),
    "REDIS_PASSWORD": ("", "required, URL-safe"),
    "LMQUEUE_MODELS_DIR": ("./models", "host folder mounted read-only at /models in workers"),
    "HF_TOKEN": ("", "hub token for gated models"),
    "HF_HUB_OFFLINE": ("0", "1: load models only from /models and the cache"),
    "TORCH_INDEX_URL": ("", "worker image build: a CPU-only torch wheel index (smaller image)"),
}


def render() -> str:
    lines = ["# lmqueue settings: every variable with its default. Copy to .env and edit.", ""]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        value = "" if default is None else str(default)
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(f"{env_names(name, field)}={value}")
    lines += ["", "# --- docker compose only (docker-compose.yml) ---"]
    for name, (value, description) in COMPOSE_ONLY.items():
        if description:
            lines.append(f"# {description}")
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
