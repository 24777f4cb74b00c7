"""Issue 13 through the official `openai` SDK against the live stack (API + a real worker on the
tiny model): batches of completions, chat and /v1/responses lines that use penalties, logit_bias,
logprobs, n and structured output, answered in the SDK's own types; refused fields are named
per line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from cli.stack import Stack
from tests.batch_client import batch_stack, content_lines, create, sdk, wait_done

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "colour", "n"],
    "additionalProperties": False,
}
CHAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def cstack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    yield from batch_stack(database_url, redis_url, tiny_model_dir, tmp_path_factory.mktemp("c"))


def _line(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}}


def _run(stack: Stack, lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
    client = sdk(stack)
    batch = wait_done(client, create(client, lines, endpoint=endpoint).id, timeout_s=300)
    assert batch.status == "completed", batch
    out = content_lines(client, batch.output_file_id)
    assert content_lines(client, batch.error_file_id) == []
    return {o["custom_id"]: o["response"]["body"] for o in out}


def test_completions_sampling_logprobs_n_echo(cstack: Stack) -> None:
    url = "/v1/completions"
    lines = [
        _line(
            "pen",
            url,
            prompt="x = 1",
            max_tokens=6,
            temperature=0,
            presence_penalty=1.0,
            frequency_penalty=0.5,
            repetition_penalty=1.2,
            logit_bias={"42": 100},
        ),
        _line("lp", url, prompt="x = 1", max_tokens=4, temperature=0, logprobs=3),
        _line(
            "n",
            url,
            prompt="x = 1",
            max_tokens=4,
            temperature=0.9,
            seed=7,
            n=3,
            top_k=20,
            min_p=0.05,
            stop=["\n\n"],
        ),
        _line("echo", url, prompt="x = 1", max_tokens=3, temperature=0, echo=True),
    ]
    out = {k: Completion.model_validate(v) for k, v in _run(cstack, lines, url).items()}
    assert out["pen"].choices[0].text  # logit_bias 100 on one token: it is all that comes out
    lp = out["lp"].choices[0].logprobs
    assert lp is not None and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or [])
    assert lp.top_logprobs and all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == out["lp"].choices[0].text
    n = out["n"]
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert n.usage is not None and n.usage.prompt_tokens == out["lp"].usage.prompt_tokens  # type: ignore[union-attr]
    assert out["echo"].choices[0].text.startswith("x = 1")


def test_chat_logprobs_and_structured_output(cstack: Stack) -> None:
    url = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "Give me a thing."}]
    lines = [
        _line(
            f"s{i}",
            url,
            messages=msgs,
            max_completion_tokens=120,
            seed=i,
            response_format=CHAT_FORMAT,
            n=2,
        )
        for i in range(4)
    ] + [
        _line(
            "obj",
            url,
            messages=msgs,
            max_completion_tokens=3,
            temperature=0,
            response_format={"type": "json_object"},
        ),
        _line("lp", url, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2),
    ]
    out = {k: ChatCompletion.model_validate(v) for k, v in _run(cstack, lines, url).items()}
    for i in range(4):
        choices = out[f"s{i}"].choices
        assert len(choices) == 2
        for c in choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content or ""), SCHEMA)
    assert out["obj"].choices[0].finish_reason == "length"  # cut short
    content = out["lp"].choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)
    usage = out["lp"].usage
    assert usage is not None and usage.prompt_tokens_details is not None


def test_responses_lines(cstack: Stack) -> None:
    url = "/v1/responses"
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA}}
    lines = [
        _line(
            "text",
            url,
            input="Say hi.",
            instructions="Be brief.",
            max_output_tokens=5,
            temperature=0,
        ),
        _line(
            "msgs",
            url,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            max_output_tokens=100,
            text=fmt,
            store=False,
        ),
    ]
    out = {k: Response.model_validate(v) for k, v in _run(cstack, lines, url).items()}
    text = out["text"]
    assert text.status == "incomplete" and text.incomplete_details is not None
    assert text.instructions == "Be brief." and text.usage is not None
    assert text.usage.input_tokens > 0 and text.usage.output_tokens == 5
    assert out["msgs"].status == "completed"
    jsonschema.validate(json.loads(out["msgs"].output_text), SCHEMA)


def test_refused_fields_are_named_per_line(cstack: Stack) -> None:
    client = sdk(cstack)
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    lines = [
        _line("ok", chat, messages=msgs),  # 1
        _line("tools", chat, messages=msgs, tools=[{"type": "function"}]),  # 2
        _line("typo", chat, messages=msgs, max_tokns=3),  # 3
        _line("top", chat, messages=msgs, top_logprobs=2),  # 4 without logprobs
        _line("stream", chat, messages=msgs, stream=True, n=2),  # 5
        _line("bias", chat, messages=msgs, logit_bias={"5": 101}),  # 6
    ]
    batch = wait_done(client, create(client, lines, endpoint=chat).id)
    assert batch.status == "failed"
    got = {(e.line, e.param) for e in batch.errors.data or []}  # type: ignore[union-attr]
    assert got == {
        (2, "body.tools"),
        (3, "body.max_tokns"),
        (4, "body.top_logprobs"),
        (5, "body.stream"),
        (6, "body.logit_bias"),
    }
    resp = [_line("r", "/v1/responses", input="x", previous_response_id="resp_1")]
    batch = wait_done(client, create(client, resp, endpoint="/v1/responses").id)
    assert batch.status == "failed"
    assert [(e.line, e.param) for e in batch.errors.data or []] == [  # type: ignore[union-attr]
        (1, "body.previous_response_id")
    ]
