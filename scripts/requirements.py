"""Print pyproject's runtime dependencies, one per line, for image builds.

  python scripts/requirements.py --light   # without torch & co (API, scheduler, Flower image)
  python scripts/requirements.py           # all of them (worker image; torch installed first)
  python scripts/requirements.py --extras quant,gptq   # ... plus these optional extras

The light image then installs the package itself with `pip install --no-deps`, so pyproject
stays the one list of dependencies.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Only the worker needs these; `api/` and `lmqueue/` never import them (tests/test_boundaries.py).
WORKER_ONLY = frozenset({"torch", "transformers", "tokenizers", "safetensors", "accelerate"})


def dist_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return match.group(1).lower().replace("_", "-") if match else requirement


# What the worker image serves every documented model kind with (bnb-int8/nf4, gptq).
WORKER_EXTRAS = ("quant", "gptq")


def requirements(light: bool, extras: tuple[str, ...] = ()) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps: list[str] = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    return [d for d in deps if not (light and dist_name(d) in WORKER_ONLY)]


def _extras(argv: list[str]) -> tuple[str, ...]:
    if "--extras" not in argv:
        return ()
    return tuple(e for e in argv[argv.index("--extras") + 1].split(",") if e)


if __name__ == "__main__":
    args = sys.argv[1:]
    print("\n".join(requirements(light="--light" in args, extras=_extras(args))))
