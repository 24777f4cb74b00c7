"""A request body, validated once, turned into what a generation backend runs."""

from __future__ import annotations

from typing import Any, Protocol

from lmqueue.errors import describe_validation
from lmqueue.formats import grammar_key
from lmqueue.responses_schema import ResponsesBody
from lmqueue.schemas import ChatBody, CompletionBody, parse_body
from worker.gen_types import GenRequest, RequestError


class Encoder(Protocol):
    def encode(self, body: CompletionBody | ChatBody) -> list[int]: ...


def gen_request(encoder: Encoder, endpoint: str, body: dict[str, Any]) -> GenRequest:
    """The typed body -> a GenRequest (the body is validated once, here)."""
    from pydantic import ValidationError

    try:
        typed = parse_body(endpoint, body)
    except KeyError as exc:
        raise RequestError("unsupported_endpoint", f"unknown endpoint {endpoint}") from exc
    except ValidationError as exc:
        message, param = describe_validation(exc.errors())
        raise RequestError("invalid_request", message, param) from exc
    reply: dict[str, Any] = {}
    if isinstance(typed, ResponsesBody):
        reply = typed.model_dump(
            include={"instructions", "max_output_tokens", "temperature", "top_p", "text"},
            by_alias=True,
            exclude_none=True,
        )
        typed = typed.to_chat()
    if not isinstance(typed, CompletionBody | ChatBody):
        raise RequestError("unsupported_endpoint", f"a generation model does not serve {endpoint}")
    if isinstance(typed, CompletionBody):
        max_tokens, logprobs = typed.max_tokens, typed.logprobs
        echo = str(typed.prompt) if typed.echo else ""  # the validator made it one string
    else:
        max_tokens, logprobs, echo = typed.new_tokens(), typed.top_n(), ""
    key = grammar_key(typed.response_format)
    compile_grammar = getattr(encoder, "compile_grammar", None)
    if key is not None and compile_grammar is None:
        raise RequestError(
            "unsupported_parameter", "this backend has no structured output", "response_format"
        )
    return GenRequest(
        prompt_ids=encoder.encode(typed),
        max_tokens=max_tokens or 16,
        temperature=typed.temperature,
        top_p=typed.top_p,
        stop=typed.stop_list(),
        seed=typed.seed,
        top_k=typed.top_k,
        min_p=typed.min_p,
        presence_penalty=typed.presence_penalty,
        frequency_penalty=typed.frequency_penalty,
        repetition_penalty=typed.repetition_penalty,
        logit_bias=typed.bias(),
        logprobs=logprobs,
        n=typed.n,
        grammar=compile_grammar(key) if key is not None and compile_grammar else None,
        echo_text=echo,
        reply=reply,
        stream=typed.stream,  # the API accepted it: the job asked for per-step deltas
    )
