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


def render() -> str:
    lines = ["# lmqueue settings: every variable with its default. Copy to .env and edit.", ""]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        value = "" if default is None else str(default)
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(f"{env_names(name, field)}={value}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
