"""Issue 13 on the real tiny model: per-row sampling parameters (penalties, logit_bias, top-k,
min-p, seeds) inside one batched step match a straightforward reference implementation; logprobs
come from the logits the sampler used; n choices share the prompt; structured output always
parses and validates."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine import Engine, GenRequest, GenResult
from worker.requests import gen_request

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return Engine(model, tok, torch.device("cpu"), max_context=512, name="tiny")


def req(engine: Engine, **body: Any) -> GenRequest:
    return gen_request(engine, "/v1/completions", {"model": "tiny", "prompt": "x = 1", **body})


# ---- the reference: one row, the whole sequence recomputed every step, plain Python --------


def reference(engine: Engine, r: GenRequest, index: int = 0) -> tuple[list[int], list[float]]:
    """Tokens and chosen-token logprobs of one request, by the definitions (no cache, no
    batch): OpenAI's presence/frequency penalties over generated tokens, vLLM's repetition
    penalty over prompt + generated tokens, logit_bias added first; then temperature, top-k,
    top-p over the top-k mass, min-p, one uniform draw from the row's generator."""
    gen: list[int] = []
    lps: list[float] = []
    g = None
    if r.temperature > 0:
        g = torch.Generator().manual_seed((r.seed or 0) + index)
    for _ in range(r.max_tokens):
        with torch.no_grad():
            ids = torch.tensor([r.prompt_ids + gen])
            logits = engine.model(input_ids=ids).logits[0, -1].float().clone()
        for t, b in r.logit_bias.items():
            logits[t] += b
        counts = Counter(gen)
        for t in set(r.prompt_ids + gen):
            x = float(logits[t])
            logits[t] = x / r.repetition_penalty if x > 0 else x * r.repetition_penalty
        for t, c in counts.items():
            logits[t] -= r.frequency_penalty * c + r.presence_penalty
        logp = torch.log_softmax(logits, -1)
        tok = int(logits.argmax()) if g is None else _draw(logits, r, g)
        lps.append(float(logp[tok]))
        if tok in engine.eos_ids:
            lps.pop()
            break
        gen.append(tok)
    return gen, lps


def _draw(logits: torch.Tensor, r: GenRequest, g: torch.Generator) -> int:
    u = float(torch.rand(1, generator=g))
    probs = torch.softmax(logits / r.temperature, -1)
    order = sorted(range(len(probs)), key=lambda t: (-float(probs[t]), t))
    if r.top_k > 0:
        order = order[: r.top_k]
    total = sum(float(probs[t]) for t in order) if r.top_k > 0 else 1.0
    kept, mass = [], 0.0
    for t in order:  # nucleus: until the mass reaches top_p of what top-k kept
        if mass >= r.top_p * total:
            break
        kept.append(t)
        mass += float(probs[t])
    top = float(probs[kept[0]])
    kept = [t for t in kept if float(probs[t]) >= r.min_p * top]
    weights = [float(probs[t]) for t in kept]
    target, acc = u * sum(weights), 0.0
    for t, w in zip(kept, weights, strict=True):
        acc += w
        if acc > target:
            return t
    return kept[-1]


CASES: list[dict[str, Any]] = [
    {"temperature": 0, "presence_penalty": 1.5},
    {"temperature": 0, "frequency_penalty": 2.0, "presence_penalty": -0.5},
    {"temperature": 0, "repetition_penalty": 1.8},
    {"temperature": 0, "logit_bias": {"7": 9.5, "12": -100}},
    {"temperature": 0.8, "seed": 5, "top_k": 4},
    {"temperature": 1.0, "seed": 9, "min_p": 0.2},
    {"temperature": 0.9, "seed": 3, "top_k": 30, "top_p": 0.8, "frequency_penalty": 0.7},
    {"temperature": 0},  # a plain batch-mate: parameters of others never leak into it
]


def test_per_row_parameters_in_one_batch_match_the_reference(engine: Engine) -> None:
    reqs = [req(engine, max_tokens=10, logprobs=2, **case) for case in CASES]
    got = engine.generate(reqs)  # all rows in one batch, every step
    for case, r, res in zip(CASES, reqs, got, strict=True):
        assert isinstance(res, GenResult), res
        tokens, lps = reference(engine, r)
        assert res.token_ids == tokens, case
        assert res.logprobs is not None
        assert [e.token for e in res.logprobs] == tokens
        assert [e.logprob for e in res.logprobs] == pytest.approx(lps, abs=1e-3), case


def test_bias_and_penalties_change_the_output(engine: Engine) -> None:
    plain, biased, pen = engine.generate(
        [
            req(engine, max_tokens=8, temperature=0),
            req(engine, max_tokens=8, temperature=0, logit_bias={"42": 100}),
            req(engine, max_tokens=8, temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
        ]
    )
    assert isinstance(biased, GenResult) and set(biased.token_ids) == {42}
    assert isinstance(plain, GenResult) and isinstance(pen, GenResult)
    assert max(Counter(pen.token_ids).values()) <= max(Counter(plain.token_ids).values())


def test_logprobs_top_alternatives(engine: Engine) -> None:
    (res,) = engine.generate([req(engine, max_tokens=5, temperature=0, logprobs=3)])
    assert isinstance(res, GenResult) and res.logprobs is not None
    for e in res.logprobs:
        assert len(e.top) == 3 and e.top[0][0] == e.token  # greedy: the chosen is the best
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
        assert e.text == engine.decode_text([e.token])


def test_n_choices_share_the_prompt_and_match_single_requests(engine: Engine) -> None:
    prompt = "def handler(event, context):\n    return event\n" * 3  # > the 32-token prefix
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 40}
    hits = engine.stats.prefix_hits
    (res,) = engine.generate([req(engine, n=3, **body)])
    assert isinstance(res, GenResult)
    choices = res.choices()
    assert [c.index for c in choices] == [0, 1, 2]
    assert engine.stats.prefix_hits == hits + 1  # the prompt was computed once for all three
    assert all(c.cached_tokens > 0 for c in res.siblings)  # the others reused its KV
    for i, c in enumerate(choices):  # choice i samples as the single request with seed + i
        (alone,) = engine.generate([req(engine, **{**body, "seed": 40 + i})])
        assert isinstance(alone, GenResult) and c.token_ids == alone.token_ids
    assert res.prompt_tokens == len(req(engine, **body).prompt_ids)  # counted once
    assert res.completion_tokens == 3 * 6  # summed over the choices (max_tokens each)


SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "colour": {"enum": ["red", "green", "blue"]},
        "tag": {"type": "string", "maxLength": 8},
        "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    },
    "required": ["ok", "count", "colour", "tag", "items"],
    "additionalProperties": False,
}


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}


def test_structured_output_always_parses_and_validates(engine: Engine) -> None:
    import jsonschema

    reqs = [
        req(engine, max_tokens=200, temperature=1.0, seed=s, response_format=fmt(SCHEMA))
        for s in range(12)
    ] + [req(engine, max_tokens=20, temperature=0)]  # a free batch-mate
    *structured, free = engine.generate(reqs)
    for res in structured:
        assert isinstance(res, GenResult) and res.finish_reason == "stop", res
        jsonschema.validate(json.loads(res.text), SCHEMA)
    assert (
        isinstance(free, GenResult) and free.token_ids == engine.generate([reqs[-1]])[0].token_ids
    )  # type: ignore[union-attr]


def test_structured_output_cut_short_is_length(engine: Engine) -> None:
    (res,) = engine.generate(
        [req(engine, max_tokens=4, temperature=0, response_format=fmt(SCHEMA))]
    )
    assert isinstance(res, GenResult) and res.finish_reason == "length"
    assert res.text.startswith("{")


def test_json_object_and_the_grammar_cache(engine: Engine) -> None:
    compiled = engine._grammars.compiled if engine._grammars else 0
    one = fmt({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    for _ in range(3):
        req(engine, response_format=one)
    assert engine._grammars is not None and engine._grammars.compiled == compiled + 1
    outs = engine.generate(
        [
            req(
                engine,
                max_tokens=60,
                temperature=0.7,
                seed=s,
                response_format={"type": "json_object"},
            )
            for s in range(6)
        ]
    )
    for res in outs:
        assert isinstance(res, GenResult)
        assert res.text.startswith("{")
        if res.finish_reason == "stop":  # a random model may not close its strings in time
            assert isinstance(json.loads(res.text), dict)


def test_a_bad_schema_is_refused_by_name(engine: Engine) -> None:
    from worker.gen_types import RequestError

    with pytest.raises(RequestError) as info:
        req(engine, response_format=fmt({"type": "object", "properties": {"a": {"type": 7}}}))
    assert info.value.param == "response_format"
