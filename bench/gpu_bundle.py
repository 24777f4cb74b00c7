"""Download the wheels the GPU run needs beyond the GPU image (bench/gpu_bundle.txt) into one
git-ignored folder that travels with the device `run` as a carried path.

    python -m bench.gpu_bundle                  # .gpu-bundle/, CPython 3.12 (the GPU image)
    python -m bench.gpu_bundle --list           # print the pinned list and its recorded size
    python -m bench.gpu_bundle --python 3.11 --dest .gpu-bundle-py311   # the CPU rehearsal's

Fails (exit 1) when the folder would exceed 60 MiB: the device call carries at most 64 MiB,
the working tree included. Stdlib only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "bench" / "gpu_bundle.txt"
LIMIT_MIB = 60.0
# pip matches manylinux tags exactly: name every glibc level these wheels are published for.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
_LINE = re.compile(r"^([A-Za-z0-9._-]+)==([^\s]+)\s+([0-9.]+)\s+(.*)$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    size_mib: float  # as recorded in the list (measured when it was written)
    why: str


def read_pins(path: Path = LIST) -> list[Pin]:
    pins = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected 'name==version  size_mib  why', got {line!r}")
        pins.append(Pin(m[1], m[2], float(m[3]), m[4]))
    return pins


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20


def download(pins: list[Pin], dest: Path, python: str) -> None:
    """pip download each pin for `python` on manylinux x86_64, binary only, no dependencies."""
    if dest.exists():
        shutil.rmtree(dest)  # one version of each: a stale wheel would stop the offline install
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(dest),
        "-q",
    ]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{p.name}=={p.version}" for p in pins], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".gpu-bundle")
    ap.add_argument("--python", default="3.12", help="target CPython version (the image's)")
    ap.add_argument("--list", action="store_true", help="print the list, download nothing")
    args = ap.parse_args(argv)
    pins = read_pins()
    recorded = sum(p.size_mib for p in pins)
    if args.list:
        for p in pins:
            print(f"{p.name}=={p.version}  {p.size_mib:5.1f} MiB  {p.why}")
        print(f"total {recorded:.1f} MiB recorded (limit {LIMIT_MIB:.0f} MiB)")
        return 0 if recorded <= LIMIT_MIB else 1
    download(pins, args.dest, args.python)
    wheels = sorted(args.dest.glob("*.whl"))
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:6.1f} MiB  {w.name}")
    total = folder_mib(args.dest)
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.dest} (limit {LIMIT_MIB:.0f} MiB)")
    if len(wheels) != len(pins):
        print(f"expected {len(pins)} wheels, got {len(wheels)}", file=sys.stderr)
        return 1
    if total > LIMIT_MIB:
        print(f"the bundle exceeds {LIMIT_MIB:.0f} MiB: it cannot travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
