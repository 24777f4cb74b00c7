"""Print pyproject's runtime dependencies, one per line, for image builds.

  python scripts/requirements.py --light   # without torch & co (API, scheduler, Flower image)
  python scripts/requirements.py           # all of them (worker image; torch installed first)

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


def requirements(light: bool) -> list[str]:
    deps: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    return [d for d in deps if not (light and dist_name(d) in WORKER_ONLY)]


if __name__ == "__main__":
    print("\n".join(requirements(light="--light" in sys.argv[1:])))
