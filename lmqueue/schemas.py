"""OpenAI-shaped request bodies, validated by the API and re-read by the worker.

Nothing is silently ignored: a field is either honoured, or refused with a 400 that names it.
Unknown fields (a misspelling, a newer OpenAI field) are refused too (`extra="forbid"`), and
OpenAI fields lmqueue does not implement are declared only to refuse them with a reason
(`_refuse`). The README's "OpenAI request contract" table lists every field's status.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmqueue.formats import ResponseFormat

MAX_NEW_TOKENS = 4096
DEFAULT_CHAT_MAX_TOKENS = 256
MAX_N = 16  # choices per request: each one holds a decode slot
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
ENDPOINTS = (COMPLETIONS, CHAT, EMBEDDINGS, RESPONSES)

# Fields that identify the caller or hint at caching; they never change an answer.
_ACCEPTED_IDS = ("user", "safety_identifier", "prompt_cache_key")


def _refuse(reason: str) -> Any:
    """A field declared only so that a non-empty value is refused by name with `reason`."""
    return Field(default=None, description=f"refused: {reason}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, max_length=200)
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _refused(self) -> _Body:
        for name, info in type(self).model_fields.items():
            refused = (info.description or "").startswith("refused: ")
            if refused and getattr(self, name) not in (None, False, [], {}):
                reason = (info.description or "").removeprefix("refused: ")
                raise ValueError(_Named(name, reason))
        return self


class _Named(str):
    """A refusal message that knows its field (errors.describe_validation reads `field`)."""

    field: str

    def __new__(cls, field: str, reason: str) -> _Named:
        obj = super().__new__(cls, reason)
        obj.field = field
        return obj


class SamplingFields(_Body):
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=1_000_000)  # vLLM's extension; 0 or -1 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # vLLM's extension
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    # Publish per-step deltas (job events, the synchronous endpoints' chunk streams). Accepted
    # where a reader exists: lmqueue.validation.check_request refuses it in batch lines.
    stream: bool = False
    response_format: ResponseFormat | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    stream_options: Any = _refuse(
        "only on the synchronous endpoints (POST /v1/completions, /v1/chat/completions)"
    )
    service_tier: Any = _refuse("lmqueue has one service tier")
    store: Any = _refuse("lmqueue does not store completions for distillation")
    metadata: Any = _refuse("lmqueue does not store completions (metadata is for store)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in stops):
                raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (non-negative integers), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
        return v

    @model_validator(mode="after")
    def _stream_n(self) -> SamplingFields:
        if self.stream and self.n > 1:
            raise ValueError(_Named("n", "n > 1 cannot be streamed; drop stream or set n=1"))
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # the validator already normalised it to a list

    def bias(self) -> dict[int, float]:
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: Any = _refuse("insertion (suffix) is not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("a list prompt must hold exactly one string; submit one job each")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _combos(self) -> CompletionBody:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(_Named("best_of", "only best_of equal to n (or unset) is supported"))
        if self.echo and self.logprobs is not None:
            raise ValueError(_Named("echo", "echo with logprobs (prompt logprobs) is refused"))
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[dict[str, Any]]) -> str:
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


_NO_TOOLS = "tools / function calling are not supported by lmqueue's chat templates"


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = _refuse(_NO_TOOLS)
    tool_choice: Any = _refuse(_NO_TOOLS)
    parallel_tool_calls: Any = _refuse(_NO_TOOLS)
    functions: Any = _refuse(_NO_TOOLS)
    function_call: Any = _refuse(_NO_TOOLS)
    modalities: Any = _refuse("text is the only modality")
    audio: Any = _refuse("text is the only modality")
    prediction: Any = _refuse("predicted outputs are not supported")
    reasoning_effort: Any = _refuse("no reasoning models are served")
    verbosity: Any = _refuse("not supported")
    web_search_options: Any = _refuse("web search is not supported")

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(_Named("top_logprobs", "requires logprobs: true"))
        return self

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": str(m.content)} for m in self.messages]

    def top_n(self) -> int | None:
        """Alternatives per token (None: no logprobs at all)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingBody(_Body):
    input: str | list[str]
    encoding_format: Literal["float"] = "float"
    dimensions: Any = _refuse("the model's own dimension is the only one")

    @model_validator(mode="after")
    def _check(self) -> EmbeddingBody:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items or any(not isinstance(s, str) or not s for s in items):
            raise ValueError("input must be a non-empty string or list of non-empty strings")
        if len(items) > 2048:
            raise ValueError("input: at most 2048 items")
        return self

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _body_models() -> dict[str, type[BaseModel]]:
    from lmqueue.responses_schema import ResponsesBody  # it builds on the classes above

    return {
        COMPLETIONS: CompletionBody,
        CHAT: ChatBody,
        EMBEDDINGS: EmbeddingBody,
        RESPONSES: ResponsesBody,
    }


def parse_body(endpoint: str, body: dict[str, Any]) -> BaseModel:
    """Validate a request body for an endpoint; raises pydantic.ValidationError or KeyError."""
    return _body_models()[endpoint].model_validate(body)
