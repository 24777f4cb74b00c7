"""What the generation engines take and give back: requests, results, per-request errors and
per-step token events. Plain dataclasses, shared by every backend (worker.engines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmqueue.errors import error_object


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False  # publish per-step text deltas (TokenEvent) for this request
    top_k: int = 0  # <= 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: minus this once a token has been generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's generated count
    repetition_penalty: float = 1.0  # vLLM/HF: prompt and generated tokens, divide/multiply
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token to report (None: no logprobs)
    n: int = 1  # choices, each its own row (seed + index when seeded)
    grammar: Any = None  # a compiled grammar (worker.structured); None: free text
    echo_text: str = ""  # completions `echo`: the prompt text, put before the output
    reply: dict[str, Any] = field(default_factory=dict)  # request fields the answer repeats

    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt positions whose KV was reused, not computed
    admitted_step: int = 0  # the loop step that prefilled it (rows prefilled together share it)
    batch_rows: int = 1  # the most rows it decoded alongside (itself included)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids
    index: int = 0  # which of the request's n choices
    siblings: list[GenResult] = field(default_factory=list)  # choices 1..n-1 (n > 1)
    reply: dict[str, Any] = field(default_factory=dict)  # the request's GenRequest.reply
    echoed: int = 0  # characters of `text` that are the echoed prompt (completions echo)

    def choices(self) -> list[GenResult]:
        return [self, *self.siblings]


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives, taken from the
    logits the sampler chose from (after logit_bias, penalties and any grammar mask; before
    temperature, top-k/top-p/min-p)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    # The tokens as text (filled when the result is built: rows.result).
    text: str = ""
    top_text: list[str] = field(default_factory=list)


# The model produced NaN/inf for a request (its logits or embeddings).
NUMERICAL_ERROR = "numerical_error"


class RequestError(Exception):
    """A permanent, per-request error (400-style): it fails this request only."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def as_dict(self) -> dict[str, str | None]:
        """OpenAI-shaped error object."""
        return error_object(self.message, param=self.param, code=self.code)

    def __repr__(self) -> str:
        return f"RequestError({self.code!r}, {self.message!r}, {self.param!r})"


@dataclass(frozen=True)
class TokenEvent:
    """New output of one streaming request after a step: the text it added (possibly empty while
    a multi-byte character is incomplete) and its completion tokens so far."""

    key: str
    text: str
    completion_tokens: int


Outcome = GenResult | RequestError
