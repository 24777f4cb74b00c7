"""Our own code's deprecations fail the test run (pyproject's filterwarnings), so a call that a
pinned-range upgrade would break is fixed before the upgrade, not after."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["worker.engine", "lmqueue.jobs", "api.app"])
def test_a_deprecation_attributed_to_our_code_is_an_error(category: type, module: str) -> None:
    with pytest.raises(category):
        warnings.warn_explicit("old call", category, f"{module}.py", 1, module=module)


def test_a_library_deprecation_elsewhere_is_only_a_warning() -> None:
    with pytest.warns(DeprecationWarning):
        warnings.warn_explicit("old call", DeprecationWarning, "lib.py", 1, module="somelib.core")
