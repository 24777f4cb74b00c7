"""One conformance test set for every generation backend behind `worker.backends.base.Backend`:
the slot loop (`lmqueue`) and transformers' continuous batching (`hf-paged`), on the real tiny
demo model, driven the way `worker.loop` drives them (admit, step, cancel, idle).

Each backend gets its own model instance: transformers' manager switches the model it runs to
its own attention setup."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker.backends.base import Backend
from worker.backends.hf_paged import HFPagedBackend
from worker.engine import Engine, GenRequest, GenResult, RequestError
from worker.gen_types import Outcome

BACKENDS = ["lmqueue", "hf-paged"]
SLOTS = 4
PROMPTS = [
    "x",
    "import os\n",
    "class Foo:\n    def __init__(self):",
    "def f(a, b):\n    return a + b\n\n\nprint(f(1, 2))",
    "#" * 40,
]


def load_engine(model_dir: Path) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return Engine(model, tok, torch.device("cpu"), max_context=256, name="tiny")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    """A model untouched by any backend: HF `generate` and the prompt encoder."""
    return load_engine(tiny_model_dir)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Backend]:
    engine = load_engine(tiny_model_dir)
    if request.param == "hf-paged":
        hf = HFPagedBackend(engine, SLOTS, prefill_budget=512)
        yield hf
        hf.close()
    else:
        yield engine.slots(SLOTS, prefill_budget=512)


def ids(reference: Engine, text: str) -> list[int]:
    return reference.prompt_ids("/v1/completions", {"prompt": text})


def greedy(reference: Engine, prompt: list[int], max_new: int) -> list[int]:
    """HF `generate` on one prompt alone, EOS and what follows stripped."""
    with torch.inference_mode():
        out = reference.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
        )
    new: list[int] = out[0, len(prompt) :].tolist()
    eos = [i for i, t in enumerate(new) if t in reference.eos_ids]
    return new[: eos[0]] if eos else new


def run(backend: Backend, results: dict[str, Outcome], steps: int = 5000) -> list[str]:
    """Step until the backend holds nothing; returns the keys it dropped."""
    dropped: list[str] = []
    for _ in range(steps):
        if backend.idle():
            return dropped
        out = backend.step()
        results.update(out.finished)
        dropped += out.dropped
    raise AssertionError("the backend did not finish")


def run_all(backend: Backend, reqs: list[GenRequest]) -> list[Outcome]:
    results: dict[str, Outcome] = {}
    for i, req in enumerate(reqs):
        err = backend.admit(str(i), req)
        if err is not None:
            results[str(i)] = err
    run(backend, results)
    return [results[str(i)] for i in range(len(reqs))]


def ok(res: Outcome) -> GenResult:
    assert isinstance(res, GenResult), res
    return res


def test_greedy_matches_hf_generate(backend: Backend, reference: Engine) -> None:
    budgets = [20, 5, 12, 24, 1]
    prompts = [ids(reference, p) for p in PROMPTS]
    reqs = [GenRequest(p, m, temperature=0) for p, m in zip(prompts, budgets, strict=True)]
    for prompt, budget, res in zip(prompts, budgets, run_all(backend, reqs), strict=True):
        got = ok(res)
        assert got.token_ids == greedy(reference, prompt, budget)
        assert got.finish_reason == "length" and got.completion_tokens == budget
        assert got.prompt_tokens == len(prompt)
        assert got.text == reference.decode_text(got.token_ids)


def test_max_tokens(backend: Backend, reference: Engine) -> None:
    for budget in (1, 7):
        (res,) = run_all(backend, [GenRequest(ids(reference, PROMPTS[2]), budget, temperature=0)])
        got = ok(res)
        assert (got.finish_reason, got.completion_tokens, len(got.token_ids)) == (
            "length",
            budget,
            budget,
        )


def test_stop_strings(backend: Backend, reference: Engine) -> None:
    prompt = ids(reference, PROMPTS[3])
    full = reference.decode_text(greedy(reference, prompt, 30))
    k = len(full) // 2
    stop = full[k : k + 3]
    cut = full.find(stop)
    assert cut > 0
    req = GenRequest(prompt, 30, temperature=0, stop=["never appears \x00", stop])
    mate = GenRequest(ids(reference, "x"), 6, temperature=0)
    res, plain = run_all(backend, [req, mate])
    got = ok(res)
    assert (got.finish_reason, got.text) == ("stop", full[:cut])
    assert got.completion_tokens < 30
    assert reference.decode_text(got.token_ids).startswith(full[:cut] + stop)
    assert ok(plain).completion_tokens == 6


def test_eos_ends_a_row(backend: Backend, reference: Engine) -> None:
    prompt = ids(reference, PROMPTS[4])
    plain = greedy(reference, prompt, 9)
    eos = plain[3]  # declare the 4th generated token an EOS
    first = plain.index(eos)
    engine: Engine = backend.engine  # type: ignore[attr-defined]
    saved = engine.eos_ids
    engine.eos_ids = {eos}
    try:
        (res,) = run_all(backend, [GenRequest(prompt, 9, temperature=0)])
    finally:
        engine.eos_ids = saved
    got = ok(res)
    assert got.finish_reason == "stop"
    assert got.token_ids == plain[:first]  # EOS excluded from the output...
    assert got.completion_tokens == first + 1  # ...but counted


def test_seed(backend: Backend, reference: Engine) -> None:
    prompt = ids(reference, PROMPTS[3])
    seeded = GenRequest(prompt, 10, temperature=0.9, seed=11)
    mate = GenRequest(ids(reference, PROMPTS[1]), 5, temperature=0)
    if isinstance(backend, HFPagedBackend):  # one global seed: refused per row, by name
        err, res = run_all(backend, [seeded, mate])
        assert isinstance(err, RequestError) and err.param == "temperature", err
        assert err.as_dict()["code"] == "unsupported_parameter"
        err2, _ = run_all(backend, [GenRequest(prompt, 10, temperature=0, seed=11), mate])
        assert isinstance(err2, RequestError) and err2.param == "seed", err2
        assert "seed" in err2.message and "hf-paged" in err2.message
        assert ok(res).token_ids == greedy(reference, mate.prompt_ids, 5)  # batch-mate unhurt
        with pytest.raises(RequestError) as refused:
            backend.prepare("/v1/completions", {"model": "t", "prompt": "x", "seed": 3})
        assert refused.value.param == "temperature"  # the OpenAI default 1.0 samples
        return
    alone = ok(run_all(backend, [seeded])[0])
    together = ok(run_all(backend, [mate, seeded])[1])
    assert alone.token_ids == together.token_ids


def test_cancel_frees_the_slot(backend: Backend, reference: Engine) -> None:
    long_req = GenRequest(ids(reference, PROMPTS[2]), 200, temperature=0)
    short_req = GenRequest(ids(reference, PROMPTS[0]), 8, temperature=0)
    results: dict[str, Outcome] = {}
    assert backend.admit("long", long_req) is None
    assert backend.admit("short", short_req) is None
    for _ in range(3):
        results.update(backend.step().finished)
    backend.cancel(["long"])
    dropped = run(backend, results)
    assert dropped == ["long"] and "long" not in results
    assert ok(results["short"]).token_ids == greedy(reference, short_req.prompt_ids, 8)
    assert backend.capacity() == SLOTS
    # The slot is usable again, with the same output as before.
    (again,) = run_all(backend, [short_req])
    assert ok(again).token_ids == ok(results["short"]).token_ids


def test_row_joining_mid_run_matches_alone(backend: Backend, reference: Engine) -> None:
    reqs = [GenRequest(ids(reference, p), 6 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    results: dict[str, Outcome] = {}
    for i, req in enumerate(reqs):  # one new row every two steps, more rows than slots
        while backend.capacity() == 0:
            results.update(backend.step().finished)
        assert backend.admit(str(i), req) is None
        for _ in range(2):
            results.update(backend.step().finished)
    run(backend, results)
    for i, req in enumerate(reqs):
        alone = greedy(reference, req.prompt_ids, req.max_tokens)
        assert ok(results[str(i)]).token_ids == alone, i


def test_bad_rows_fail_alone(backend: Backend, reference: Engine) -> None:
    too_long = GenRequest(list(range(3, 250)), 50, temperature=0)
    good = GenRequest(ids(reference, PROMPTS[1]), 4, temperature=0)
    err, res = run_all(backend, [too_long, good])
    assert isinstance(err, RequestError) and err.code == "context_length_exceeded"
    assert ok(res).token_ids == greedy(reference, good.prompt_ids, 4)


def test_a_failed_row_in_the_engine_is_a_server_error() -> None:
    """hf-paged reports a request the manager failed as `engine_error`: a 500, not a 400."""
    from worker.loop_parts import finished_outcome

    err = RequestError("engine_error", "hf-paged failed this request: boom")
    outcome = finished_outcome("j1", "/v1/completions", "tiny", err)
    assert outcome.error is not None
    assert (outcome.error["status_code"], outcome.error["type"]) == (500, "server_error")
