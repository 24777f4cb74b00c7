#!/usr/bin/env bash
# GPU check of the inference engine: fp16, bnb-int8, bnb-nf4 and GPTQ through worker.engine on
# a ~1B-parameter random-weight Llama built here (the demo tokenizer + a bigger LlamaConfig; no
# hub access), at batch 1 / 16 / 64, printing tokens/s and peak GPU memory. Meant to finish in
# under 10 minutes on one modern GPU.
#
#   bash bench/gpu_check.sh                    # on a CUDA machine, from the repository root
#   GPU_CHECK_TINY=1 bash bench/gpu_check.sh   # the same script on CPU with a tiny model
#
# Needs torch (CUDA build) and transformers; bitsandbytes and gptqmodel+optimum for their rows
# (a missing one is reported as skipped, not fatal). Environment knobs: PYTHON (interpreter),
# GPU_CHECK_DIR (where the model is built; default a temp dir), GPU_CHECK_NEW_TOKENS (64),
# GPU_CHECK_PROMPT_TOKENS (128), GPU_CHECK_BUDGET_S (540: later paths are skipped past it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
exec "$PYTHON" - <<'PY'
import gc
import importlib.metadata as md
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
started = time.perf_counter()
TINY = os.environ.get("GPU_CHECK_TINY") == "1"
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "540"))
NEW = int(os.environ.get("GPU_CHECK_NEW_TOKENS", "8" if TINY else "64"))
PROMPT = int(os.environ.get("GPU_CHECK_PROMPT_TOKENS", "32" if TINY else "128"))
BATCHES = (1, 4) if TINY else (1, 16, 64)


def version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "-"


try:
    import torch
    import transformers  # noqa: F401
except ImportError as exc:
    sys.exit(f"gpu_check: needs torch and transformers ({exc})")

print(f"python {sys.version.split()[0]}; " + "; ".join(
    f"{p} {version(p)}" for p in ("torch", "transformers", "bitsandbytes", "gptqmodel", "optimum")
))
if TINY:
    DEVICE = "cpu"
elif not torch.cuda.is_available():
    sys.exit("gpu_check: CUDA is not available (GPU_CHECK_TINY=1 runs the CPU variant)")
else:
    DEVICE = "cuda:0"
    print(f"GPU: {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")

from lmqueue.registry import ModelSpec  # noqa: E402
from worker.demo_model import build_tokenizer  # noqa: E402
from worker.engine import Engine, GenRequest, GenResult  # noqa: E402
from worker.loading import load_engine  # noqa: E402


def build_model(out: Path) -> Path:
    """A random-weight Llama: ~1.0B parameters (22 x 2048, GQA 16/4 heads, 5632 MLP)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    t0 = time.perf_counter()
    tok = build_tokenizer(8000, 4096)
    dims = (128, 2, 4, 2, 256) if TINY else (2048, 22, 16, 4, 5632)
    hidden, layers, heads, kv_heads, mlp = dims
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
        max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dtype = torch.float32 if TINY else torch.float16
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(dtype)  # initialised on the device: seconds
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False,
    )
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    gc.collect()
    print(f"built a {n / 1e9:.2f}B-parameter model in {out} in {time.perf_counter() - t0:.0f}s")
    return out


def gptq_checkpoint(src: Path) -> Path:
    from worker.gptq import quantize_gptq

    t0 = time.perf_counter()
    out = quantize_gptq(src, src.parent / (src.name + "-gptq4"), bits=4, group_size=128,
                        device=DEVICE)
    print(f"GPTQ 4-bit checkpoint in {time.perf_counter() - t0:.0f}s")
    return out


def run_path(label: str, path: Path, quantization: str, dtype: str) -> list[str]:
    rows = []
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = load_engine(ModelSpec(name=label, path=str(path), quantization=quantization,
                                   dtype=dtype, device=DEVICE))
    assert isinstance(engine, Engine)
    engine.eos_ids = set()  # random weights: never stop early, every row decodes NEW tokens
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    vocab = len(engine.tokenizer)
    for batch in BATCHES:
        prompts = torch.randint(3, vocab, (batch, PROMPT), generator=g).tolist()
        reqs = [GenRequest(p, NEW, temperature=0) for p in prompts]
        engine.generate([GenRequest(prompts[0], 2, temperature=0)])  # warm-up
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine.generate(reqs)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert all(isinstance(r, GenResult) and r.completion_tokens == NEW for r in out), out[0]
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.startswith("cuda") else 0.0
        rows.append(f"| {label} | {batch} | {batch * NEW / dt:,.0f} | {dt:.2f} | {peak:.2f} | "
                    f"{load_s:.0f} |")
        print(rows[-1], flush=True)
    del engine
    gc.collect()
    return rows


base = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="lmq-gpu-check-"))
model_dir = build_model(base / ("tiny" if TINY else "llama-1b"))
paths = [
    ("float32" if TINY else "fp16", lambda: model_dir, "none", "float32" if TINY else "float16"),
    ("bnb-int8", lambda: model_dir, "bnb-int8", "auto" if TINY else "float16"),
    ("bnb-nf4", lambda: model_dir, "bnb-nf4", "auto" if TINY else "float16"),
    ("gptq-4bit", lambda: gptq_checkpoint(model_dir), "gptq", "auto"),
]
table = ["| path | batch | tokens/s | seconds | peak GPU GiB | load s |",
         "| --- | --- | --- | --- | --- | --- |"]
failed = 0
for label, path, quantization, dtype in paths:
    if time.perf_counter() - started > BUDGET_S:
        table.append(f"| {label} | skipped: past the {BUDGET_S:.0f}s budget | | | | |")
        continue
    try:
        table += run_path(label, path(), quantization, dtype)
    except Exception as exc:  # one broken path must not hide the others
        failed += 1
        traceback.print_exc()
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        table.append(f"| {label} | FAILED: {reason} | | | | |")
print(f"\n{PROMPT}-token prompts, {NEW} new tokens per row, greedy; device {DEVICE}; "
      f"total {time.perf_counter() - started:.0f}s\n")
print("\n".join(table))
sys.exit(1 if failed else 0)
PY
