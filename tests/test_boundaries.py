"""The light packages stay light: importing the API or the core never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

CHECK = (
    "import sys, importlib; importlib.import_module({mod!r}); "
    "heavy = [m for m in ('torch', 'transformers', 'worker') if m in sys.modules]; "
    "assert not heavy, heavy"
)


@pytest.mark.parametrize("module", ["api.app", "cli", "lmqueue.jobs", "lmqueue.broker"])
def test_import_does_not_pull_torch(module: str) -> None:
    subprocess.run([sys.executable, "-c", CHECK.format(mod=module)], check=True)
