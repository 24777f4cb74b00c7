"""The packages import one way, read statically from the source (every import statement,
including those inside functions):

    api -> core        worker -> core        scheduler -> core        migrations -> core
    cli (the shell) -> core, api, worker, scheduler        bench -> anything but tests
    core (lmqueue/) -> nothing of ours but itself

torch and transformers (and the quantization libraries) are imported only under worker/ (and by
bench/ and tests/); FastAPI, Starlette and uvicorn only under api/ and the shell.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"api", "worker", "scheduler", "lmqueue", "cli", "migrations", "bench", "tests", "scripts"}
CORE = {"lmqueue"}
MAY_IMPORT: dict[str, set[str]] = {
    "lmqueue": CORE,
    "api": {"api"} | CORE,
    "worker": {"worker"} | CORE,
    "scheduler": {"scheduler"} | CORE,
    "migrations": {"migrations"} | CORE,
    "scripts": {"scripts"} | CORE,
    "cli": {"cli", "api", "worker", "scheduler"} | CORE,
    "bench": OURS - {"tests"},
    "tests": OURS,
}
HEAVY = {"torch", "transformers", "bitsandbytes", "gptqmodel", "optimum", "accelerate"}
WEB = {"fastapi", "starlette", "uvicorn"}
MAY_USE = {
    **{name: {"worker", "bench", "tests"} for name in HEAVY},
    **{name: {"api", "cli", "bench", "tests"} for name in WEB},
}


def source_files() -> Iterator[tuple[str, Path]]:
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(parts[: len(parts) - node.level])
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            elif node.module:
                yield node.lineno, node.module


def forbidden_edges() -> list[str]:
    found = []
    for package, path in source_files():
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in OURS and top not in MAY_IMPORT[package]:
                allowed = ", ".join(sorted(MAY_IMPORT[package]))
                found.append(
                    f"{path.relative_to(ROOT)}:{line} imports {module} ({package} may "
                    f"import {allowed})"
                )
            elif top in MAY_USE and package not in MAY_USE[top]:
                found.append(
                    f"{path.relative_to(ROOT)}:{line} imports {module} (only "
                    f"{', '.join(sorted(MAY_USE[top]))} may)"
                )
    return found


def test_imports_follow_the_package_graph() -> None:
    edges = forbidden_edges()
    assert not edges, "forbidden imports:\n" + "\n".join(edges)


def test_the_graph_sees_imports_inside_functions() -> None:
    """The walk reaches nested imports: the shell's lazy uvicorn import is one of them."""
    found = {m for _line, m in imported_modules(ROOT / "cli" / "main.py")}
    assert {"uvicorn", "lmqueue.migrate", "scheduler.main"} <= found
