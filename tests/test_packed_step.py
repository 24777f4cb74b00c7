"""Packed steps (worker.packed): an admitting step decodes the live rows and prefills the new
ones in one forward. Outputs must equal the two-forward path and HF `generate`, for plain and
grouped-query attention and every model type that is packed; models the packing cannot serve
keep the two-forward path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine import Engine, GenRequest, GenResult
from worker.gen_types import Outcome
from worker.packed import PACKED_MODEL_TYPES, supports_packing

TEXTS = ["x", "import os\n", "x = 1\n" * 12, "def f(a):\n    return a\n" * 5, "#" * 80, "y"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tokenizer: Any) -> Engine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return Engine(model, tokenizer, torch.device("cpu"), max_context=256, name="tiny")


def random_model(tokenizer: Any, model_type: str, kv_heads: int = 2) -> Engine:
    """A random 2-layer model of this type, 4 query heads sharing `kv_heads` KV heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"sliding_window": None} if model_type == "mistral" else {}),  # 4096 by default
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return Engine(model, tokenizer, torch.device("cpu"), max_context=256, name=model_type)


@pytest.fixture(scope="module")
def gqa_engine(tokenizer: Any) -> Engine:
    return random_model(tokenizer, "llama")


def staggered(engine: Engine, packed: bool) -> dict[str, Outcome]:
    """One new request every two steps into 3 slots: rows join while others decode."""
    saved, engine.packed_steps = engine.packed_steps, packed
    loop = engine.slots(slots=3, prefill_budget=4096, admit_batch=1)
    results: dict[str, Outcome] = {}
    try:
        for i, text in enumerate(TEXTS):
            prompt = engine.prompt_ids("/v1/completions", {"prompt": text})
            assert loop.admit(str(i), GenRequest(prompt, 5 + 3 * i, temperature=0)) is None
            for _ in range(2):
                results.update(loop.step().finished)
        while not loop.idle():
            results.update(loop.step().finished)
    finally:
        engine.packed_steps = saved
    return results


def hf_generate(engine: Engine, text: str, new: int) -> list[int]:
    prompt = engine.prompt_ids("/v1/completions", {"prompt": text})
    out = engine.model.generate(
        torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None
    )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.parametrize("which", ["engine", "gqa_engine"])
def test_packed_steps_match_two_forwards_and_generate(which: str, request: Any) -> None:
    eng: Engine = request.getfixturevalue(which)
    assert eng.packed_steps
    before = eng.stats.packed_steps
    packed = staggered(eng, packed=True)
    assert eng.stats.packed_steps > before  # rows really joined through packed forwards
    plain = staggered(eng, packed=False)
    for i, text in enumerate(TEXTS):
        a, b = packed[str(i)], plain[str(i)]
        assert isinstance(a, GenResult) and isinstance(b, GenResult)
        assert a.token_ids == b.token_ids, (which, text)
        if a.finish_reason == "length":  # EOS ends HF generate too, but its ids then differ
            assert a.token_ids == hf_generate(eng, text, len(a.token_ids)), (which, text)


def test_models_packing_cannot_serve_keep_two_forwards() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, MistralConfig

    def tiny(cfg: Any) -> Any:
        return type("M", (), {"config": cfg})()

    small = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    assert supports_packing(tiny(LlamaConfig(**small)))
    assert not supports_packing(tiny(MistralConfig(sliding_window=16, **small)))
    assert supports_packing(tiny(MistralConfig(sliding_window=None, **small)))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=64))
    assert not supports_packing(gpt2)


def test_packed_steps_run_a_quantized_model(tiny_model_dir: Path) -> None:
    """cpu-int8 quantizes each matmul's input as a whole (one scale per tensor), so a packed
    step is not bit-identical to two forwards, as any other batch composition is not: it
    must run, and every row must get its tokens."""
    from lmqueue.registry import ModelSpec
    from worker.loading import load_engine

    eng = load_engine(ModelSpec(name="q", path=str(tiny_model_dir), quantization="cpu-int8"))
    assert isinstance(eng, Engine) and eng.packed_steps
    before = eng.stats.packed_steps
    results = staggered(eng, packed=True)
    assert eng.stats.packed_steps > before
    for i in range(len(TEXTS)):
        res = results[str(i)]
        assert isinstance(res, GenResult) and res.completion_tokens > 0, res


@pytest.mark.parametrize("model_type", sorted(PACKED_MODEL_TYPES))
def test_every_packed_model_type_matches_two_forwards(tokenizer: Any, model_type: str) -> None:
    eng = random_model(tokenizer, model_type)
    assert eng.packed_steps, model_type
    packed, plain = staggered(eng, packed=True), staggered(eng, packed=False)
    assert eng.stats.packed_steps > 0
    for i in range(len(TEXTS)):
        a, b = packed[str(i)], plain[str(i)]
        assert isinstance(a, GenResult) and isinstance(b, GenResult)
        assert a.token_ids == b.token_ids, (model_type, TEXTS[i])


def test_the_setting_turns_packing_off_in_a_worker_backend(tiny_model_dir: Path) -> None:
    """LMQUEUE_PACKED_STEPS reaches the slot loop a worker builds (worker.runtime)."""
    from lmqueue.registry import ModelSpec
    from lmqueue.settings import Settings
    from worker.runtime import make_backend
    from worker.slot_engine import SlotEngine

    spec = ModelSpec(name="tiny", path=str(tiny_model_dir))
    for on in (True, False):
        loop = make_backend(spec, Settings(packed_steps=on))
        assert isinstance(loop, SlotEngine) and loop.engine.packed_steps is on
