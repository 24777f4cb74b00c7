"""The offline demo model, model loading and the batched generation engine (CPU, float32)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.demo_model import MARKER, build_demo_model
from worker.demo_model import main as demo_main
from worker.engine import Engine, GenRequest, GenResult, RequestError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

PROMPTS = [
    "x",
    "import os\n",
    "class Foo:\n    def __init__(self):",
    "def f(a, b):\n    return a + b\n\n\nprint(f(1, 2))",
    "for i in range(10):\n    print(i)",
    "#" * 40,
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model, cached across runs (rebuilt when the recipe version changes)."""
    cache = Path(os.environ.get("LMQUEUE_TEST_CACHE", "~/.cache/lmqueue-tests")).expanduser()
    try:
        return build_demo_model(cache / "tiny", "tiny")
    except OSError:  # read-only home: build per session
        return build_demo_model(tmp_path_factory.mktemp("demo") / "tiny", "tiny")


@pytest.fixture(scope="module")
def hf(tiny_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(hf: tuple[Any, Any]) -> Engine:
    model, tokenizer = hf
    return Engine(model, tokenizer, torch.device("cpu"), max_context=256, name="tiny")


def ids_of(engine: Engine, prompt: str) -> list[int]:
    return engine.prompt_ids(COMPLETIONS, {"model": "tiny", "prompt": prompt})


def ok(result: GenResult | RequestError) -> GenResult:
    assert isinstance(result, GenResult), result
    return result


def reference_greedy(model: Any, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    """One prompt alone through model.generate (no padding), EOS stripped."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
        )
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new


# ---- demo model -----------------------------------------------------------------------------


def test_demo_model_builds_and_reloads(tiny_dir: Path, hf: tuple[Any, Any]) -> None:
    model, tokenizer = hf
    marker = json.loads((tiny_dir / MARKER).read_text())
    assert marker["size"] == "tiny"
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.padding_side == "left"
    assert tokenizer.chat_template
    assert 1500 <= len(tokenizer) <= 2000
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 4)
    assert (cfg.intermediate_size, cfg.max_position_embeddings) == (128, 256)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.dtype == torch.float32
    text = "def f(x):\n    return x  # é ✓\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless

    # Idempotent: a second build returns at once and leaves the files alone.
    weights = tiny_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_demo_model(tiny_dir, "tiny") == tiny_dir
    assert demo_main([str(tiny_dir)]) == 0
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.timeout(120)
def test_demo_model_concurrent_builds_and_stale_dir(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("not a demo model: never replaced")
    with pytest.raises(FileExistsError):
        build_demo_model(out, "tiny")
    (out / "notes.txt").unlink()
    (out / MARKER).write_text(json.dumps({"size": "bench", "recipe": 0}))  # another build
    results: list[Path | BaseException] = []

    def build() -> None:
        try:
            results.append(build_demo_model(out, "tiny"))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [out, out]
    assert json.loads((out / MARKER).read_text())["size"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind
    # Deterministic: the same weights and tokenizer as the cached build, and the same config
    # but for the transformers version that wrote it (a cache may predate an upgrade).
    for name in ("tokenizer.json", "model.safetensors"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes()
    configs = [json.loads((d / "config.json").read_text()) for d in (out, tiny_dir)]
    for config in configs:
        config.pop("transformers_version", None)
    assert configs[0] == configs[1]


# ---- loading --------------------------------------------------------------------------------


def test_load_engine(tiny_dir: Path) -> None:
    from lmqueue.registry import ModelSpec
    from worker.loading import load_engine

    engine = load_engine(ModelSpec(name="tiny", path=str(tiny_dir)))
    assert engine.device == torch.device("cpu")
    assert engine.model.dtype == torch.float32 and not engine.model.training
    assert engine.max_context == 256 and engine.name == "tiny"
    assert engine.tokenizer.padding_side == "left"
    result = ok(engine.generate([GenRequest(ids_of(engine, "x = 1"), 4, temperature=0)])[0])
    assert result.completion_tokens == 4

    spec = ModelSpec(name="tiny", path=str(tiny_dir), max_context=64, dtype="bfloat16")
    engine = load_engine(spec)
    assert engine.max_context == 64 and engine.model.dtype == torch.bfloat16


def test_load_engine_errors(tiny_dir: Path, tmp_path: Path) -> None:
    from lmqueue.registry import ModelSpec
    from worker.loading import ModelLoadError, load_engine

    # A GPTQ model must be a GPTQ checkpoint: never guessed, never silently served unquantized.
    with pytest.raises(ModelLoadError, match="GPTQ-quantized checkpoint|gptqmodel") as info:
        load_engine(ModelSpec(name="q", path=str(tiny_dir), quantization="gptq"))
    assert "'q'" in str(info.value) and str(tiny_dir) in str(info.value)
    with pytest.raises(ModelLoadError, match="float32 weights"):
        load_engine(
            ModelSpec(name="q", path=str(tiny_dir), quantization="cpu-int8", dtype="float16")
        )

    missing = tmp_path / "nothing-here"
    with pytest.raises(ModelLoadError, match="no such file or directory") as info:
        load_engine(ModelSpec(name="gone", path=str(missing)))
    assert "'gone'" in str(info.value) and str(missing) in str(info.value)


# ---- prompts --------------------------------------------------------------------------------


def test_completion_prompt_gets_one_bos(engine: Engine) -> None:
    bos = engine.tokenizer.bos_token_id
    ids = ids_of(engine, "hello world")
    assert ids[0] == bos and bos not in ids[1:]
    assert ids[1:] == engine.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert ids_of(engine, "<|bos|>hello world") == ids  # not doubled
    assert engine.prompt_ids(COMPLETIONS, {"prompt": ["hello world"]}) == ids
    with pytest.raises(RequestError) as info:
        engine.prompt_ids("/v1/embeddings", {"input": "x"})
    assert info.value.code == "unsupported_endpoint"


def test_chat_template_path(engine: Engine, hf: tuple[Any, Any]) -> None:
    _, tokenizer = hf
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}],
        },
    ]
    ids = engine.prompt_ids(CHAT, {"model": "tiny", "messages": messages})
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert expected.startswith("<|bos|><|system|>\n") and expected.endswith("<|assistant|>\n")
    assert tokenizer.decode(ids) == expected
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    result = ok(engine.generate([GenRequest(ids, 5, temperature=0)])[0])
    assert result.prompt_tokens == len(ids) and result.completion_tokens == 5

    with pytest.raises(RequestError) as info:
        engine.prompt_ids(CHAT, {"messages": [{"role": "tool", "content": "x"}]})
    assert info.value.code == "invalid_messages"


def test_no_chat_template(hf: tuple[Any, Any]) -> None:
    from transformers import AutoTokenizer

    model, tokenizer = hf
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    engine = Engine(model, plain, torch.device("cpu"), max_context=256, name="plain")
    with pytest.raises(RequestError) as info:
        engine.prompt_ids(CHAT, {"messages": [{"role": "user", "content": "hi"}]})
    assert info.value.code == "chat_template_missing"
    assert info.value.as_dict()["code"] == "chat_template_missing"

    plain.chat_template = "{{ raise_exception('this model takes no system prompt') }}"
    with pytest.raises(RequestError) as info:
        engine.prompt_ids(CHAT, {"messages": [{"role": "system", "content": "hi"}]})
    assert info.value.code == "chat_template_error" and "no system prompt" in info.value.message


# ---- generation -----------------------------------------------------------------------------


def test_greedy_batch_matches_generate(engine: Engine, hf: tuple[Any, Any]) -> None:
    model, tokenizer = hf
    prompts = [ids_of(engine, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: padding varies
    # Different budgets, so rows leave the batch at different steps.
    budgets = [24, 5, 16, 30, 1, 12]
    results = engine.generate(
        [GenRequest(p, m, temperature=0) for p, m in zip(prompts, budgets, strict=True)]
    )
    for prompt, budget, result in zip(prompts, budgets, results, strict=True):
        result = ok(result)
        expected = reference_greedy(model, prompt, budget, tokenizer.eos_token_id)
        assert result.token_ids == expected
        assert result.prompt_tokens == len(prompt)
        assert result.finish_reason == "length" and result.completion_tokens == budget
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_positions_and_shrinking_batch(engine: Engine) -> None:
    # Llama's RoPE is relative, so wrong absolute positions would not change its output:
    # check the position ids and batch sizes the model actually receives.
    seen: list[tuple[list[list[int]], list[list[int]]]] = []

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append((kwargs["position_ids"].tolist(), kwargs["attention_mask"].tolist()))

    prompts = [ids_of(engine, p) for p in ("x", "import os\n", PROMPTS[2])]
    lengths = [len(p) for p in prompts]
    handle = engine.model.model.register_forward_pre_hook(spy, with_kwargs=True)
    engine.prefill_max_waste = 1.0  # one padded prefill (tests/test_batching.py: split ones)
    try:
        engine.generate(
            [GenRequest(p, m, temperature=0) for p, m in zip(prompts, (3, 1, 5), strict=True)]
        )
    finally:
        handle.remove()
        engine.prefill_max_waste = 0.1
    pos0, mask0 = seen[0]  # prefill: left padding, real tokens at positions 0..n-1
    T = max(lengths)
    for row, n in enumerate(lengths):
        assert mask0[row] == [0] * (T - n) + [1] * n
        assert pos0[row][T - n :] == list(range(n))
    # Row 1 (1 token) leaves after the prefill, row 0 after 3 tokens, row 2 runs to 5.
    assert [len(p) for p, _ in seen] == [3, 2, 2, 1, 1]
    assert [p for p, _ in seen[1:3]] == [
        [[lengths[0]], [lengths[2]]],
        [[lengths[0] + 1], [lengths[2] + 1]],
    ]
    assert seen[-1][0] == [[lengths[2] + 3]]
    assert len(seen[-1][1][0]) == T + 4  # the mask covers the cache plus the new token


def test_seeded_sampling_ignores_batch_mates(engine: Engine) -> None:
    mine = GenRequest(ids_of(engine, "import os\n"), 20, temperature=0.8, top_p=0.9, seed=7)
    alone = ok(engine.generate([mine])[0])
    mates = [
        GenRequest(ids_of(engine, PROMPTS[3]), 3, temperature=0),  # longer: pads `mine`
        mine,
        GenRequest(ids_of(engine, PROMPTS[2]), 25, temperature=1.3, seed=8),
        GenRequest(ids_of(engine, "x"), 7, temperature=1.0),  # unseeded
    ]
    in_batch = ok(engine.generate(mates)[1])
    assert in_batch.token_ids == alone.token_ids and in_batch.text == alone.text
    twins = engine.generate([mine, mine])
    assert ok(twins[0]).token_ids == ok(twins[1]).token_ids == alone.token_ids

    other_seed = GenRequest(mine.prompt_ids, 20, temperature=0.8, top_p=0.9, seed=8)
    assert ok(engine.generate([other_seed])[0]).token_ids != alone.token_ids


def test_tiny_top_p_is_greedy(engine: Engine) -> None:
    prompt = ids_of(engine, PROMPTS[2])
    greedy = ok(engine.generate([GenRequest(prompt, 15, temperature=0)])[0])
    nucleus = ok(engine.generate([GenRequest(prompt, 15, temperature=1.0, top_p=1e-6)])[0])
    assert nucleus.token_ids == greedy.token_ids


def test_stop_strings(engine: Engine) -> None:
    prompt = ids_of(engine, PROMPTS[3])
    full = ok(engine.generate([GenRequest(prompt, 30, temperature=0)])[0])
    # A stop string that first shows up in the middle of the greedy text.
    k = len(full.text) // 2
    stop = full.text[k : k + 3]
    cut = full.text.find(stop)
    assert cut > 0

    res, plain = engine.generate(
        [
            GenRequest(prompt, 30, temperature=0, stop=["never appears \x00", stop]),
            GenRequest(ids_of(engine, "x"), 6, temperature=0),
        ]
    )
    res = ok(res)
    assert res.finish_reason == "stop"
    assert res.text == full.text[:cut]
    assert stop not in res.text
    assert res.token_ids == full.token_ids[: res.completion_tokens]
    assert res.completion_tokens < 30
    # The row that ends on the stop string has produced the stop string's last character.
    produced = engine.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    assert produced.startswith(full.text[:cut] + stop)
    assert ok(plain).completion_tokens == 6 and ok(plain).finish_reason == "length"


def test_max_tokens_and_eos(engine: Engine) -> None:
    prompt = ids_of(engine, PROMPTS[4])
    res = ok(engine.generate([GenRequest(prompt, 9, temperature=0)])[0])
    assert res.finish_reason == "length"
    assert res.completion_tokens == 9 == len(res.token_ids)

    # Declare the 4th generated token an EOS: the row stops there, EOS excluded from the
    # output but counted in completion_tokens.
    eos = res.token_ids[3]
    first = res.token_ids.index(eos)
    saved = engine.eos_ids
    engine.eos_ids = {eos}
    try:
        stopped = ok(engine.generate([GenRequest(prompt, 9, temperature=0)])[0])
    finally:
        engine.eos_ids = saved
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == res.token_ids[:first]
    assert stopped.completion_tokens == first + 1


def test_bad_requests_fail_alone(engine: Engine) -> None:
    good = [GenRequest(ids_of(engine, p), 8, temperature=0) for p in PROMPTS[:3]]
    solo = [ok(engine.generate([g])[0]) for g in good]
    long_prompt = ids_of(engine, "a = 1\n" * 200)
    assert len(long_prompt) > 256
    near_limit = [1] + [ids_of(engine, "#")[-1]] * 249  # 250 tokens
    batch = [
        good[0],
        GenRequest(near_limit, 10, temperature=0),  # 250 + 10 > 256
        good[1],
        GenRequest(long_prompt, 5, temperature=0),
        GenRequest([], 5, temperature=0),
        good[2],
        GenRequest(near_limit, 6, temperature=0),  # exactly 256: fine
    ]
    results = engine.generate(batch)
    too_many = results[1]
    assert isinstance(too_many, RequestError)
    assert too_many.code == "context_length_exceeded" and too_many.param == "max_tokens"
    assert too_many.message == (
        "This model's maximum context length is 256 tokens; "
        "the request needs 250 prompt + 10 completion tokens"
    )
    too_long = results[3]
    assert isinstance(too_long, RequestError)
    assert too_long.code == "context_length_exceeded" and too_long.param == "prompt"
    empty = results[4]
    assert isinstance(empty, RequestError) and empty.param == "prompt"
    for i, expected in zip((0, 2, 5), solo, strict=True):
        assert ok(results[i]).token_ids == expected.token_ids
    assert ok(results[6]).completion_tokens == 6


def test_nan_logits_fail_one_row(engine: Engine) -> None:
    requests = [GenRequest(ids_of(engine, p), 6, temperature=0) for p in PROMPTS[:3]]
    solo = [ok(engine.generate([r])[0]) for r in requests]
    calls = 0

    def poison_row_1_at_prefill(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            output = output.clone()
            output[1] = float("nan")
        return output

    handle = engine.model.lm_head.register_forward_hook(poison_row_1_at_prefill)
    engine.prefill_max_waste = 1.0  # one prefill call holds all three rows
    try:
        results = engine.generate(requests)
    finally:
        handle.remove()
        engine.prefill_max_waste = 0.1
    assert isinstance(results[1], RequestError) and results[1].code == "numerical_error"
    assert ok(results[0]).token_ids == solo[0].token_ids
    assert ok(results[2]).token_ids == solo[2].token_ids
    assert engine.generate([]) == []
