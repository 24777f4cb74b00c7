"""What the generation engines take and give back: requests, results, per-request errors and
per-step token events. Plain dataclasses, shared by every backend (worker.engines)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
