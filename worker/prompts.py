"""Turning an OpenAI request body into prompt token ids (completions and chat)."""

from __future__ import annotations

from typing import Any

from lmqueue.schemas import CHAT, COMPLETIONS, ChatBody, CompletionBody
from worker.gen_types import RequestError


class PromptEncoder:
    def __init__(self, tokenizer: Any, name: str = ""):
        self.tokenizer = tokenizer
        self.name = name
        self.bos_id: int | None = tokenizer.bos_token_id

    def encode(self, body: CompletionBody | ChatBody) -> list[int]:
        """The prompt token ids of a validated body."""
        if isinstance(body, CompletionBody):
            return self._completion_ids(body.prompt)
        return self._chat_dicts(body.message_dicts())

    def prompt_ids(self, endpoint: str, body: dict[str, Any]) -> list[int]:
        """/v1/completions: tokenize body['prompt'] (a str; add the BOS token if the tokenizer
        defines one and does not add it itself).
        /v1/chat/completions: tokenizer.apply_chat_template(messages, add_generation_prompt=True).
        Raises RequestError('chat_template_missing', ...) when the tokenizer has no chat template.
        """
        if endpoint == COMPLETIONS:
            return self._completion_ids(body.get("prompt"))
        if endpoint == CHAT:
            return self._chat_ids(body.get("messages"))
        raise RequestError("unsupported_endpoint", f"model {self.name!r} does not serve {endpoint}")

    def _completion_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("invalid_prompt", "prompt must be a string", "prompt")
        ids: list[int] = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _chat_ids(self, messages: Any) -> list[int]:
        from pydantic import ValidationError

        from lmqueue.schemas import ChatMessage

        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "chat_template_missing",
                f"model {self.name!r} has no chat template; use /v1/completions instead",
                "messages",
            )
        if not isinstance(messages, list) or not messages:
            raise RequestError("invalid_messages", "messages must be a non-empty list", "messages")
        try:
            parsed = [ChatMessage.model_validate(m) for m in messages]
        except ValidationError as exc:
            raise RequestError("invalid_messages", str(exc), "messages") from exc
        return self._chat_dicts([{"role": m.role, "content": str(m.content)} for m in parsed])

    def _chat_dicts(self, dicts: list[dict[str, str]]) -> list[int]:
        from jinja2 import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "chat_template_missing",
                f"model {self.name!r} has no chat template; use /v1/completions instead",
                "messages",
            )
        try:
            out = self.tokenizer.apply_chat_template(
                dicts, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:
            raise RequestError(
                "chat_template_error", f"the chat template rejected the messages: {exc}", "messages"
            ) from exc
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding
            out = out["input_ids"]
        if out and isinstance(out[0], list):  # a batch of one
            out = out[0]
        return [int(t) for t in out]
