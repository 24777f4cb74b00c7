"""OpenAI's streamed chunk objects (completions and chat completions), built from a job's
deltas and its final result."""

from __future__ import annotations

import base64
import struct
from typing import Any

from lmqueue.schemas import CHAT


def chunk(
    endpoint: str,
    job_id: str,
    model: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    first: bool = False,
) -> dict[str, Any]:
    """One chunk; a chat stream's first chunk also says the role, as OpenAI's does."""
    if endpoint == CHAT:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        obj, prefix = "chat.completion.chunk", "chatcmpl"
    else:
        choice = {"index": 0, "text": text or ""}
        obj, prefix = "text_completion", "cmpl"
    choice.update({"logprobs": None, "finish_reason": finish_reason})
    return {
        "id": f"{prefix}-{job_id}",
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(endpoint: str, job_id: str, model: str, created: int, usage: Any) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    body = chunk(endpoint, job_id, model, created, None)
    body["choices"] = []
    body["usage"] = usage
    return body


def final_text(result: dict[str, Any], endpoint: str) -> tuple[str, str | None]:
    """(text, finish_reason) of a stored completion or chat completion."""
    choice = (result.get("choices") or [{}])[0]
    if endpoint == CHAT:
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    return str(text), choice.get("finish_reason")


def base64_embeddings(result: dict[str, Any]) -> dict[str, Any]:
    """An embeddings response with each vector as base64 of little-endian float32, as OpenAI
    answers `encoding_format: "base64"`."""
    data = []
    for item in result.get("data", []):
        vec = item["embedding"]
        packed = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({**item, "embedding": packed})
    return {**result, "data": data}
