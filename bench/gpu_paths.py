"""One path of the GPU check per process (bench/gpu_check.py runs each under its own timeout).

    python -m bench.gpu_paths build  --model DIR --out ROWS.jsonl [--tiny]
    python -m bench.gpu_paths fp16   --model DIR --out ROWS.jsonl [--tiny]   # bf16, bnb-int8,
                                                                           # bnb-nf4, oom, ...

Every path goes through the worker's real engine: `worker.loading.load_engine` (the registry's
`ModelSpec`, bitsandbytes through `worker.quantization`) and the slot loop
(`worker.slot_engine.SlotEngine`) that the Celery worker drives. The model is a ~1B-parameter
random Llama (22 x 2048, GQA 16/4 heads, 5632 MLP) with the demo tokenizer, built on the device
(no hub access); `--tiny` builds a 0.3M one so the same code runs on a CPU as a rehearsal.

Each measurement is one JSON object per line in --out: path, rows, tokens/s, decode step time,
prefill time, peak device memory, load time, status (ok | failed | skipped) and a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmqueue.registry import ModelSpec
from worker.engine import Engine, GenRequest, GenResult
from worker.loading import load_engine

CUDA = torch.cuda.is_available()
DEVICE = "cuda:0" if CUDA else "cpu"
# (hidden, layers, heads, kv heads, MLP, vocab): ~1.0B parameters, and a 0.3M rehearsal model
DIMS = {"1b": (2048, 22, 16, 4, 5632, 8000), "tiny": (64, 2, 4, 2, 128, 2000)}
PATHS = ("build", "fp16", "hf-paged", "bf16", "bnb-int8", "bnb-nf4", "oom", "tune")


class Rows:
    """Appends result rows to the JSONL file the orchestrator reads (flushed per row, so a
    path killed by its timeout still leaves the rows it finished)."""

    def __init__(self, out: Path, path: str):
        self.out = out
        self.path = path

    def add(self, status: str, note: str = "", **fields: Any) -> None:
        row = {"path": self.path, "status": status, "note": note, **fields}
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def build(model_dir: Path, tiny: bool) -> str:
    """A random-weight Llama saved with save_pretrained; weights initialised on the device."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from worker.demo_model import build_tokenizer

    hidden, layers, heads, kv_heads, mlp, vocab = DIMS["tiny" if tiny else "1b"]
    tok = build_tokenizer(vocab, 4096)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.device(DEVICE):  # initialised on the device: seconds for 1B on a GPU
        model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return f"{n / 1e6:,.1f}M parameters, float16, {DEVICE}"


def load(model_dir: Path, label: str, quantization: str, dtype: str) -> tuple[Engine, float]:
    t0 = time.perf_counter()
    fields = {"quantization": quantization, "dtype": dtype, "device": DEVICE}
    spec = ModelSpec.model_validate({"name": label, "path": str(model_dir), **fields})
    engine = load_engine(spec)
    assert isinstance(engine, Engine)
    engine.eos_ids = set()  # random weights: no early stop, every row decodes max_tokens
    return engine, time.perf_counter() - t0


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run_rows(
    engine: Engine, rows: int, prompt: int, new: int, backend: str = "lmqueue"
) -> dict[str, Any]:
    """`rows` concurrent requests through one engine backend (the slot loop, or transformers'
    paged continuous batching): every row admitted at step 1."""
    g = torch.Generator().manual_seed(rows)
    vocab = min(len(engine.tokenizer), engine.n_embeddings)
    if backend == "hf-paged":
        from worker.backends.hf_paged import HFPagedBackend

        loop: Any = HFPagedBackend(engine, rows, prefill_budget=rows * prompt)
    else:
        loop = engine.slots(rows, prefill_budget=rows * prompt)
    for i in range(rows):
        ids = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        err = loop.admit(str(i), GenRequest(ids, new, temperature=0))
        assert err is None, err
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    finished: list[tuple[str, Any]] = []
    steps: list[float] = []
    t0 = time.perf_counter()
    while not loop.idle():
        t = time.perf_counter()
        finished += loop.step().finished
        _sync()
        steps.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    if hasattr(loop, "close"):
        loop.close()
    bad = [r for _, r in finished if not (isinstance(r, GenResult) and r.completion_tokens == new)]
    if len(finished) != rows or bad:
        raise AssertionError(f"{len(finished)}/{rows} rows finished; first bad: {bad[:1]}")
    decode = steps[1:] or steps
    return {
        "rows": rows,
        "tok_s": round(rows * new / total, 1),
        "step_ms": round(1000 * sum(decode) / len(decode), 2),
        "prefill_ms": round(1000 * steps[0], 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
    }


def generation(
    out: Rows, model_dir: Path, quantization: str, dtype: str, args: Any, backend: str = "lmqueue"
) -> None:
    engine, load_s = load(model_dir, out.path, quantization, dtype)
    engine.generate([GenRequest([5, 6, 7], 2, temperature=0)])  # warm-up (kernels, allocator)
    for rows in args.rows:
        try:
            res = run_rows(engine, rows, args.prompt, args.new, backend)
            out.add("ok", load_s=round(load_s, 1), **res)
        except Exception as exc:  # the next row count may still run
            out.add("failed", f"{type(exc).__name__}: {exc}"[:300], rows=rows)
            if CUDA:
                torch.cuda.empty_cache()


def oom(out: Rows, model_dir: Path, args: Any) -> None:
    """More rows than fit: the slot loop must preempt and still finish every row.

    CUDA: a real allocator limit (`set_per_process_memory_fraction`) of what the loaded model
    holds plus a headroom the rows' KV cache cannot fit in. CPU (rehearsal): no allocator limit
    exists, so the model's forward raises torch.OutOfMemoryError above a row count instead."""
    engine, load_s = load(model_dir, out.path, "none", "float16")
    rows, new = args.oom_rows, args.oom_new
    if CUDA:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        limit = torch.cuda.memory_reserved() + int(args.oom_headroom_gib * 2**30)
        torch.cuda.set_per_process_memory_fraction(limit / total)
        how = f"allocator limit {limit / 2**30:.2f} GiB (model + {args.oom_headroom_gib} GiB)"
    else:
        _forward_oom_above(engine, cap=max(1, rows // 3))
        how = f"simulated: forward raises OutOfMemoryError above {max(1, rows // 3)} rows"
    try:
        res = run_rows(engine, rows, args.prompt, new)
        splits = engine.stats.oom_splits
        status = "ok" if splits else "failed"
        note = f"{how}; {splits} out-of-memory events, all {rows} rows finished"
        if not splits:
            note = f"{how}; no out-of-memory event happened: raise the rows or lower the headroom"
        out.add(status, note, load_s=round(load_s, 1), **res)
    finally:
        if CUDA:
            torch.cuda.set_per_process_memory_fraction(1.0)


def _forward_oom_above(engine: Engine, cap: int) -> None:
    real: Callable[..., Any] = engine.model.forward

    def forward(*a: Any, **kw: Any) -> Any:
        ids = kw.get("input_ids", a[0] if a else None)
        if ids is not None and ids.shape[0] > cap:
            raise torch.OutOfMemoryError("simulated out of memory (rehearsal)")
        return real(*a, **kw)

    engine.model.forward = forward


def tune(out: Rows, model_dir: Path, args: Any) -> None:
    """`lmqueue tune` (worker/tune.py) on the same model, when this checkout has it."""
    if importlib.util.find_spec("worker.tune") is None:
        out.add("skipped", "worker/tune.py is not in this checkout (lmqueue tune not merged yet)")
        return
    import subprocess

    # `lmqueue tune MODEL ...` is this module run in its own process (cli/main.py cmd_tune).
    cmd = [sys.executable, "-m", "worker.tune", str(model_dir), "--device", DEVICE]
    cmd += ["--dtype", "float16", "--max-slots", "64"] if CUDA else ["--max-slots", "4"]
    if args.tiny:
        cmd += ["--prompt-len", "16", "--new-tokens", "8"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tune_timeout)
    except subprocess.TimeoutExpired as exc:
        said = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        tail = said.strip().splitlines()[-2:]
        out.add("failed", f"timed out after {args.tune_timeout:.0f}s: " + " / ".join(tail))
        return
    tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
    out.add("ok" if res.returncode == 0 else "failed", " / ".join(tail)[:300])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one path of the GPU check")
    ap.add_argument("path", choices=PATHS)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rows", type=int, nargs="+")
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--new", type=int)
    ap.add_argument("--oom-rows", type=int, default=64)
    ap.add_argument("--oom-new", type=int)
    ap.add_argument("--oom-headroom-gib", type=float, default=1.0)
    ap.add_argument("--tune-timeout", type=float, default=75)
    args = ap.parse_args(argv)
    args.rows = args.rows or ([1, 4] if args.tiny else [1, 16, 64])
    args.prompt = args.prompt or (16 if args.tiny else 128)
    args.new = args.new or (8 if args.tiny else 64)
    args.oom_rows = 12 if args.tiny else args.oom_rows
    args.oom_new = args.oom_new or (8 if args.tiny else 192)
    args.tune_timeout = 110 if args.tiny else args.tune_timeout
    out = Rows(args.out, args.path)
    if args.path == "build":
        t0 = time.perf_counter()
        note = build(args.model, args.tiny)
        out.add("ok", note, load_s=round(time.perf_counter() - t0, 1))
    elif args.path == "hf-paged":
        generation(out, args.model, "none", "float16" if CUDA else "auto", args, "hf-paged")
    elif args.path in ("fp16", "bf16"):
        dtype = {"fp16": "float16", "bf16": "bfloat16"}[args.path]
        generation(out, args.model, "none", dtype, args)
    elif args.path in ("bnb-int8", "bnb-nf4"):
        # bitsandbytes computes in float16 on CUDA; the CPU rehearsal keeps float32 ("auto").
        generation(out, args.model, args.path, "float16" if CUDA else "auto", args)
    elif args.path == "oom":
        oom(out, args.model, args)
    else:
        tune(out, args.model, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
