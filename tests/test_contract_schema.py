"""Issue 13, the request models alone: every field is honoured or refused by name, and the
README's contract table lists every one of them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lmqueue.errors import describe_validation
from lmqueue.responses_schema import ResponsesBody
from lmqueue.schemas import ChatBody, CompletionBody, EmbeddingBody, parse_body

MSGS = [{"role": "user", "content": "hi"}]


def test_the_readme_table_lists_every_field() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## The OpenAI request contract") :]
    section = section[: section.index("\n## ", 5)]
    for body in (CompletionBody, ChatBody, EmbeddingBody, ResponsesBody):
        for name in body.model_fields:
            assert re.search(rf"`{name}[`.:]", section), f"{body.__name__}.{name} not in README"


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "body.suffix"),
        ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "body.top_logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "body.logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "body.echo"),
        ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, "body.best_of"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 100.5}}, "body.logit_bias"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "body.presence_penalty"),
        ("/v1/completions", {"prompt": "x", "store": True}, "body.store"),
        ("/v1/chat/completions", {"messages": MSGS, "tools": [{}]}, "body.tools"),
        ("/v1/chat/completions", {"messages": MSGS, "tool_choice": "auto"}, "body.tool_choice"),
        (
            "/v1/chat/completions",
            {"messages": MSGS, "response_format": {"type": "xml"}},
            "body.response_format.type",
        ),
        ("/v1/chat/completions", {"messages": MSGS, "audio": {"voice": "x"}}, "body.audio"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "x"}]},
            "body.messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{**MSGS[0], "name": "bob"}]},
            "body.messages.0.name",
        ),
        ("/v1/embeddings", {"input": "x", "dimensions": 8}, "body.dimensions"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "base64"}, "body.encoding_format"),
        ("/v1/responses", {"input": "x", "reasoning": {"effort": "low"}}, "body.reasoning"),
        (
            "/v1/responses",
            {"input": "x", "text": {"format": {"type": "json_schema"}}},
            "body.text.format",
        ),
    ],
)
def test_refused_by_name(endpoint: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_body(endpoint, {"model": "m", **body})
    message, got = describe_validation(info.value.errors(), "body")
    assert got == param, message


def test_honoured_fields_pass() -> None:
    body = {
        "model": "tiny",
        "messages": MSGS,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "presence_penalty": 1,
        "frequency_penalty": -1,
        "repetition_penalty": 1.1,
        "logit_bias": {"5": -100},
        "top_k": 5,
        "min_p": 0.1,
        "seed": 1,
        "stop": ["a"],
        "max_completion_tokens": 5,
        "user": "u",
        "store": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    }
    parse_body("/v1/chat/completions", body)
    text = {"format": {"type": "json_object"}}
    parse_body("/v1/responses", {"model": "m", "input": "x", "instructions": "y", "text": text})
