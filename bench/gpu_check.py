"""Run the GPU check's paths (bench/gpu_paths.py), each in its own process under its own time
budget, inside one overall budget, and print one table. Started by bench/gpu_check.sh after the
offline install; stdlib only, so an import failure shows up as a failed row, not a dead run.

    python -m bench.gpu_check [--tiny] [--budget 420] [--out-dir DIR] [--paths fp16 oom ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

# Seconds per path on the GPU (the ~1B model); a path gets min(this, what the run has left).
BUDGETS = {
    "build": 120,
    "fp16": 60,
    "hf-paged": 60,  # the second engine backend, fp16, at the same row counts
    "bf16": 60,
    "bnb-int8": 90,
    "bnb-nf4": 70,
    "oom": 120,
    "tune": 90,
    "gptq": 0,
}
TINY_BUDGET = 150  # each path on the CPU rehearsal (imports dominate on a busy 2-core box)
MIN_START_S = 15  # a path is not started with less than this left
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "accelerate",
    "bitsandbytes",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "typing-extensions",
    "numpy",
    "gptqmodel",
)
COLUMNS = ("path", "rows", "tok_s", "step_ms", "prefill_ms", "peak_gib", "load_s", "status", "note")


def versions() -> None:
    """Every version the run uses and where it comes from (bundle venv or the image)."""
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in PACKAGES:
        try:
            dist = md.distribution(name)
            where = str(dist.locate_file(""))
            print(f"  {name:18} {dist.version:14} {where}")
        except md.PackageNotFoundError:
            print(f"  {name:18} {'-':14} not installed")
    spec = importlib.util.find_spec("torch")
    if spec is not None:
        code = (
            "import torch, transformers as t; c = torch.cuda.is_available(); "
            "print('  imported: transformers', t.__version__, 'from', t.__file__); "
            "print('  cuda', torch.version.cuda, 'available' if c else 'NOT available', "
            "torch.cuda.get_device_name(0) if c else '')"
        )
        subprocess.run([sys.executable, "-c", code], timeout=60, check=False)


def skip_reason(path: str) -> str | None:
    """Paths that cannot run in this checkout or bundle, known without starting a process."""
    if path == "gptq" and importlib.util.find_spec("gptqmodel") is None:
        return (
            "gptqmodel is not carried: 7.6 is a source distribution only (CUDA build, no "
            "network on the GPU machine) and the bundle has ~3 MiB left"
        )
    if path == "gptq":
        return "gptqmodel is installed but this check has no GPTQ path yet"
    if path == "hf-paged" and importlib.util.find_spec("worker.backends.hf_paged") is None:
        return "the hf-paged backend is not in this checkout"
    if path == "tune" and importlib.util.find_spec("worker.tune") is None:
        return "worker/tune.py is not in this checkout (lmqueue tune not merged yet)"
    return None


def run_path(path: str, args: argparse.Namespace, rows_file: Path, limit: float) -> tuple[int, str]:
    """-> (exit code, last output lines); 124 when it ran past `limit` and was killed."""
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_paths",
        path,
        "--model",
        str(args.model_dir),
        "--out",
        str(rows_file),
    ] + (["--tiny"] if args.tiny else [])
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own group: a timeout kills it all
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(limit, kill)
    timer.start()
    tail: deque[str] = deque(maxlen=4)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  [{path}] {line}", end="", flush=True)
        if line.strip():
            tail.append(line.strip())
    code = proc.wait()
    timer.cancel()
    return (124 if timed_out.is_set() else code), " / ".join(tail)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = ["" if r.get(c) is None else str(r.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the GPU check's paths, one table")
    ap.add_argument("--tiny", action="store_true", help="0.3M model on the CPU (rehearsal)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all paths")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--paths", nargs="+", default=list(BUDGETS))
    args = ap.parse_args(argv)
    started = time.monotonic()
    out_dir = args.out_dir or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="gpu-model-")) / "llama"
    rows_file = out_dir / "gpu_rows.jsonl"
    rows_file.unlink(missing_ok=True)
    versions()
    summary: list[dict[str, object]] = []
    model_ok = True
    for path in args.paths:
        left = args.budget - (time.monotonic() - started)
        own = TINY_BUDGET if args.tiny else BUDGETS[path]
        reason = skip_reason(path)
        if reason:
            summary.append({"path": path, "status": "skipped", "note": reason})
            continue
        if path != "build" and not model_ok:
            summary.append({"path": path, "status": "skipped", "note": "the model build failed"})
            continue
        if left < MIN_START_S:
            summary.append(
                {"path": path, "status": "skipped", "note": f"past the {args.budget:.0f}s budget"}
            )
            continue
        before = _read(rows_file)
        t0 = time.monotonic()
        code, tail = run_path(path, args, rows_file, min(own, left))
        new = _read(rows_file)[len(before) :]
        print(f"  [{path}] exit {code} after {time.monotonic() - t0:.0f}s", flush=True)
        summary += new
        if code != 0 or not new:
            why = f"timed out after {min(own, left):.0f}s" if code == 124 else f"exit {code}"
            summary.append({"path": path, "status": "failed", "note": f"{why}: {tail}"[:300]})
            model_ok = model_ok and path != "build"
    total = time.monotonic() - started
    text = table(summary)
    device = "CPU rehearsal, tiny model" if args.tiny else "GPU, ~1B random Llama"
    header = (
        f"{device}; {'16/8' if args.tiny else '128/64'} prompt/new tokens per row (oom: "
        f"{'8' if args.tiny else '192'} new), greedy; "
        f"total {total:.0f}s of a {args.budget:.0f}s budget"
    )
    print(f"\n{header}\n\n{text}")
    (out_dir / "gpu_table.md").write_text(f"{header}\n\n{text}\n")
    return 1 if any(r.get("status") == "failed" for r in summary) else 0


def _read(rows_file: Path) -> list[dict[str, object]]:
    if not rows_file.exists():
        return []
    return [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
