"""Every quantization path really loads the tiny model and runs it through the engine (CPU).

On a random-weight model quantization moves the greedy tokens a lot, so these tests do not
compare with float32 (bench/engine.py reports that agreement on the bench model); they check
that the weights really are quantized and that the engine runs the quantized model exactly as
plain `model.generate` does.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lmqueue.registry import ModelSpec
from worker.engine import Engine, GenRequest, GenResult
from worker.loading import load_engine
from worker.quantization import checkpoint_quant_method

pytestmark = pytest.mark.timeout(240)

PROMPTS = ["import os\n", "def f(a, b):\n    return a + b\n", "class Foo:\n    def __init__(self):"]
CACHE = Path(os.environ.get("LMQUEUE_TEST_CACHE", Path.home() / ".cache" / "lmqueue-tests"))


def engine_for(path: Path, quantization: str, **spec: Any) -> Engine:
    engine = load_engine(ModelSpec(name="q", path=str(path), quantization=quantization, **spec))
    assert isinstance(engine, Engine)
    return engine


def generate_matches_hf(engine: Engine, max_new: int = 8) -> None:
    """Each prompt alone through the engine == `model.generate` on the same (quantized) model.

    One prompt at a time: int8 activation quantization is per batch (LLM.int8's outlier columns,
    dynamic int8's per-tensor scale), so a row's tokens may legitimately depend on its batch.
    """
    for text in PROMPTS:
        ids = engine.prompt_ids("/v1/completions", {"prompt": text})
        ours = engine.generate([GenRequest(ids, max_new, temperature=0)])[0]
        assert isinstance(ours, GenResult), ours
        with torch.inference_mode():
            out = engine.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new,
            )
        ref = out[0, len(ids) :].tolist()
        eos = engine.tokenizer.eos_token_id
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert ours.token_ids == ref, text
    # And a real batch of mixed lengths runs too, every row with its full usage.
    batch = [GenRequest(engine.prompt_ids("/v1/completions", {"prompt": p}), 5) for p in PROMPTS]
    results = engine.generate([GenRequest(r.prompt_ids, 5, temperature=0) for r in batch])
    assert all(isinstance(r, GenResult) and r.completion_tokens >= 1 for r in results)


def test_bnb_int8(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="pip install 'lmqueue[quant]'")
    import bitsandbytes as bnb

    engine = engine_for(tiny_model_dir, "bnb-int8")
    proj = engine.model.model.layers[0].mlp.up_proj
    assert isinstance(proj, bnb.nn.Linear8bitLt) and proj.weight.dtype == torch.int8
    generate_matches_hf(engine)


def test_bnb_nf4(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="pip install 'lmqueue[quant]'")
    import bitsandbytes as bnb

    engine = engine_for(tiny_model_dir, "bnb-nf4")
    proj = engine.model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, bnb.nn.Linear4bit) and proj.weight.quant_state.quant_type == "nf4"
    generate_matches_hf(engine)


def test_cpu_int8_dynamic(tiny_model_dir: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    engine = engine_for(tiny_model_dir, "cpu-int8")
    linears = [m for m in engine.model.modules() if isinstance(m, DynamicQuantizedLinear)]
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert not any(type(m) is torch.nn.Linear for m in engine.model.modules())
    generate_matches_hf(engine)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu(tiny_model_dir: Path, dtype: str) -> None:
    # Meant for CUDA; on CPU it works (slowly), which is what CI can check.
    engine = engine_for(tiny_model_dir, "none", dtype=dtype)
    assert engine.model.dtype == getattr(torch, dtype)
    generate_matches_hf(engine)


def _gptq_tiny(tiny_dir: Path) -> Path:
    """The tiny model quantized to 4-bit GPTQ once, cached next to it (about a minute cold:
    gptqmodel compiles a CPU packing kernel the first time; seconds after that)."""
    from worker.demo_model import RECIPE_VERSION
    from worker.gptq import quantize_gptq

    try:
        return quantize_gptq(tiny_dir, CACHE / f"tiny-gptq4-r{RECIPE_VERSION}")
    except OSError:  # read-only cache
        return quantize_gptq(tiny_dir, tiny_dir.parent / f"tiny-gptq4-{os.getpid()}")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_gptq_checkpoint(tiny_model_dir: Path) -> None:
    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"GPTQ needs {', '.join(missing)}: pip install 'lmqueue[gptq]'")
    path = _gptq_tiny(tiny_model_dir)
    engine = engine_for(path, "gptq")
    q_proj = engine.model.model.layers[0].self_attn.q_proj
    assert q_proj.bits == 4 and type(q_proj).__module__.startswith("gptqmodel.")
    assert checkpoint_quant_method(str(path)) == "gptq"
    generate_matches_hf(engine)
