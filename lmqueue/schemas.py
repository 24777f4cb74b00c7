"""OpenAI-shaped request bodies, validated by the API and re-read by the worker.

Unknown fields are ignored (as OpenAI-compatible servers usually do), but fields that would
change the meaning of a request and that lmqueue does not implement are rejected by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_NEW_TOKENS = 4096
DEFAULT_CHAT_MAX_TOKENS = 256

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (COMPLETIONS, CHAT, EMBEDDINGS)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(min_length=1, max_length=200)


class SamplingFields(_Body):
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = 1
    # Publish per-step deltas (job events, the synchronous endpoints' chunk streams). Accepted
    # where a reader exists: lmqueue.validation.check_request refuses it in batch lines.
    stream: bool = False

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

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported; submit one job per sample")
        return v

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # the validator already normalised it to a list


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    logprobs: int | None = None
    echo: bool = False

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

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> None:
        if v is not None:
            raise ValueError("logprobs is not supported")
        return None

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[Any] | None) -> None:
        if v:
            raise ValueError("tools are not supported")
        return None

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": str(m.content)} for m in self.messages]


class EmbeddingBody(_Body):
    input: str | list[str]
    encoding_format: Literal["float"] = "float"
    dimensions: int | None = None

    @model_validator(mode="after")
    def _check(self) -> EmbeddingBody:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items or any(not isinstance(s, str) or not s for s in items):
            raise ValueError("input must be a non-empty string or list of non-empty strings")
        if len(items) > 2048:
            raise ValueError("input: at most 2048 items")
        if self.dimensions is not None:
            raise ValueError("dimensions is not supported")
        return self

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


BODY_BY_ENDPOINT: dict[str, type[_Body]] = {
    COMPLETIONS: CompletionBody,
    CHAT: ChatBody,
    EMBEDDINGS: EmbeddingBody,
}


def parse_body(endpoint: str, body: dict[str, Any]) -> _Body:
    """Validate a request body for an endpoint; raises pydantic.ValidationError or KeyError."""
    return BODY_BY_ENDPOINT[endpoint].model_validate(body)
