"""A request body, validated once, turned into what a generation backend runs."""

from __future__ import annotations

from typing import Any, Protocol

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
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError("invalid_request", f"{param}: {err['msg']}", param) from exc
    if not isinstance(typed, CompletionBody | ChatBody):
        raise RequestError("unsupported_endpoint", f"a generation model does not serve {endpoint}")
    max_tokens = typed.max_tokens if isinstance(typed, CompletionBody) else typed.new_tokens()
    return GenRequest(
        prompt_ids=encoder.encode(typed),
        max_tokens=max_tokens or 16,
        temperature=typed.temperature,
        top_p=typed.top_p,
        stop=typed.stop_list(),
        seed=typed.seed,
        stream=typed.stream,  # the API accepted it: the job asked for per-step deltas
    )
