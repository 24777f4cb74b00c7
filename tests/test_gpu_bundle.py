"""The GPU run's imports resolve on the GPU image plus the carried bundle, and the bundle fits.

Static: the import closure of what bench/gpu_check.sh executes (bench/gpu_check.py and
bench/gpu_paths.py, through every project module they reach) is read from the source with
`ast`, and every third-party distribution it needs must be on the image's documented list
(bench/gpu_image_packages.txt) or pinned in bench/gpu_bundle.txt. The pinned wheels' own
dependencies must be met the same way. No GPU, no network.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.gpu_bundle import LIMIT_MIB, folder_mib, read_pins

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"lmqueue", "worker", "bench", "api", "scheduler", "cli"}
ENTRIES = ["bench.gpu_check", "bench.gpu_paths"]
# Run by the `tune` path as `python -m worker.tune` (a string the import walk cannot see).
SUBPROCESS_ENTRIES = ["worker.tune"]
# Imported by transformers on the run's behalf (BitsAndBytesConfig paths), not by our code.
RUNTIME = {"bitsandbytes": "the bnb-int8 / bnb-nf4 paths (transformers imports it)"}
# Imported only inside a guard for a feature the GPU run does not use; without the package the
# feature is refused by name, so the run does not need it carried.
OPTIONAL = {"xgrammar": "structured output (the `structured` extra; worker/structured.py)"}
CARRY_LIMIT_MIB = 64.0
# The GPU image's interpreter, for environment markers in the wheels' requirements.
IMAGE_ENV: dict[str, str] = {
    **{k: str(v) for k, v in default_environment().items()},
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "platform_system": "Linux",
}


def image_packages() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for line in (ROOT / "bench" / "gpu_image_packages.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version or None
    return found


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(module: str, path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (functions included: a path may run
    them), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for top in ast.walk(tree) if _type_checking_only(top) for n in ast.walk(top)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = (
                    module.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else (module.split(".")[: len(module.split(".")) - node.level + 1])
                )
                base = ".".join(pkg + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def closure() -> tuple[set[str], set[str]]:
    """-> (project modules reached, top-level third-party import names)."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = ENTRIES + [m for m in SUBPROCESS_ENTRIES if module_file(m) is not None]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        for name in imports_of(mod, module_file(mod)):  # type: ignore[arg-type]
            top = name.split(".")[0]
            if top in PROJECT:
                if module_file(name) is not None:
                    todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return seen, third


def test_the_gpu_runs_imports_resolve_on_the_image_plus_the_bundle() -> None:
    modules, third = closure()
    assert {"worker.engine", "worker.slot_engine", "worker.loading", "lmqueue.registry"} <= modules
    dists = md.packages_distributions()
    bundle = {canonicalize_name(p.name) for p in read_pins()}
    image = image_packages()
    missing = {}
    for top in sorted(third - set(OPTIONAL)) + sorted(RUNTIME):
        for dist in dists.get(top, [top]):
            if canonicalize_name(dist) not in bundle and canonicalize_name(dist) not in image:
                missing[top] = dist
    assert not missing, (
        f"the GPU run imports packages neither on the image nor in the bundle: "
        f"{missing} (reached through {sorted(m for m in modules if m.split('.')[0] != 'bench')})"
    )


def _requirements(name: str, version: str) -> list[Requirement] | None:
    """The pinned wheel's Requires-Dist: from the downloaded bundle if there, else from this
    environment when it has the same version; None when neither is available."""
    wheels = list((ROOT / ".gpu-bundle").glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if wheels:
        import zipfile

        with zipfile.ZipFile(wheels[0]) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
    else:
        try:
            if md.version(name) != version:
                return None
        except md.PackageNotFoundError:
            return None
        reqs = md.requires(name) or []
    return [Requirement(r) for r in reqs]


def test_the_bundles_own_dependencies_are_on_the_image_or_in_the_bundle() -> None:
    pins = {canonicalize_name(p.name): p.version for p in read_pins()}
    image = image_packages()
    unmet, unchecked = [], []
    for name, version in pins.items():
        reqs = _requirements(name, version)
        if reqs is None:
            unchecked.append(name)
            continue
        for req in reqs:
            env: dict[str, str] = {**IMAGE_ENV, "extra": ""}
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform / Python
            dep = canonicalize_name(req.name)
            have = pins.get(dep) or image.get(dep, "missing")
            if dep not in pins and dep not in image:
                unmet.append(f"{name} needs {req} (not on the image, not in the bundle)")
            elif (
                have is not None
                and have != "missing"
                and not req.specifier.contains(have, prereleases=True)
            ):
                unmet.append(
                    f"{name} needs {req}; {'bundle' if dep in pins else 'image'} has {have}"
                )
    assert not unmet, unmet
    if len(unchecked) == len(pins):  # CI may hold other versions and no downloaded bundle
        pytest.skip(f"no metadata for the pinned versions here: {unchecked}")


def test_the_bundle_list_fits_the_carry_limit() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu_bundle", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert sum(p.size_mib for p in read_pins()) <= LIMIT_MIB
    pins = read_pins()
    assert len({canonicalize_name(p.name) for p in pins}) == len(pins)  # one version of each


def test_a_built_bundle_and_the_working_tree_fit_one_device_call() -> None:
    folder = ROOT / ".gpu-bundle"
    if not any(folder.glob("*.whl")):
        pytest.skip("no .gpu-bundle here: `make gpu-bundle` builds it")
    names = {w.name.split("-")[0].lower() for w in folder.glob("*.whl")}
    assert names == {p.name.replace("-", "_").lower() for p in read_pins()}
    assert folder_mib(folder) <= LIMIT_MIB
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tree = sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file()) / 2**20
    assert tree + folder_mib(folder) < CARRY_LIMIT_MIB, f"tree {tree:.1f} MiB + bundle"
