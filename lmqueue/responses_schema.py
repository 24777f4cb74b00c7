"""`/v1/responses` request bodies (OpenAI's Batch API accepts them as lines): text or messages in,
mapped onto the same chat generation (`ResponsesBody.to_chat`); answered in the Responses shape
(worker/responses.py). Fields of the Responses API lmqueue does not implement are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmqueue.formats import TextFormat
from lmqueue.schemas import (
    _NO_TOOLS,
    MAX_NEW_TOKENS,
    ChatBody,
    ChatMessage,
    _Body,
    _refuse,
)

DEFAULT_OUTPUT_TOKENS = 256


class InputMessage(BaseModel):
    """An input item of type message: its content is text or input_text / output_text parts."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[dict[str, Any]]) -> str:
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") not in ("input_text", "output_text") or not isinstance(
                part.get("text"), str
            ):
                raise ValueError("only input_text / output_text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Any = _refuse("not supported")


class ResponsesBody(_Body):
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    text: TextOptions | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    store: Any = _refuse("lmqueue does not store responses (send store: false)")
    tools: Any = _refuse(_NO_TOOLS)
    tool_choice: Any = _refuse(_NO_TOOLS)
    parallel_tool_calls: Any = _refuse(_NO_TOOLS)
    max_tool_calls: Any = _refuse(_NO_TOOLS)
    previous_response_id: Any = _refuse("responses are not stored; send the whole input")
    conversation: Any = _refuse("responses are not stored; send the whole input")
    prompt: Any = _refuse("stored prompt templates are not supported")
    reasoning: Any = _refuse("no reasoning models are served")
    include: Any = _refuse("no extra output items are available")
    background: Any = _refuse("a batch line already runs in the background")
    stream: Any = _refuse("a batch line is not streamed")
    stream_options: Any = _refuse("a batch line is not streamed")
    truncation: Any = _refuse("inputs are never truncated; a too-long input is refused")
    top_logprobs: Any = _refuse("logprobs are served by /v1/chat/completions lines")
    metadata: Any = _refuse("responses are not stored")
    service_tier: Any = _refuse("lmqueue has one service tier")

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[InputMessage]) -> str | list[InputMessage]:
        if not v:
            raise ValueError("input must not be empty")
        return v

    def to_chat(self) -> ChatBody:
        """The same request as a chat completion (instructions become a system message)."""
        items = self.input
        if isinstance(items, str):
            items = [InputMessage(role="user", content=items)]
        messages = []
        if self.instructions:
            messages.append(ChatMessage(role="system", content=self.instructions))
        messages += [ChatMessage(role=m.role, content=m.content) for m in items]
        fmt = self.text.format if self.text else None
        return ChatBody(
            model=self.model,
            messages=messages,
            max_completion_tokens=self.max_output_tokens or DEFAULT_OUTPUT_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            response_format=fmt.as_response_format() if fmt else None,
        )
