"""OpenAI-shaped response bodies and error objects built from engine results: completions, chat
completions (n choices, logprobs), Responses (for /v1/responses batch lines) and embeddings."""

from __future__ import annotations

import time
from typing import Any

from lmqueue import errors
from lmqueue.schemas import CHAT, RESPONSES
from worker.embedding import EmbedResult
from worker.engine import GenResult, RequestError
from worker.gen_types import TokenLogprob


def usage(result: GenResult) -> dict[str, Any]:
    """The prompt is counted once whatever n; cached_tokens: prompt positions whose KV was
    reused (a shared prefix) rather than computed."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def completion_body(job_id: str, endpoint: str, model: str, result: GenResult) -> dict[str, Any]:
    created = int(time.time())
    if endpoint == RESPONSES:
        return responses_body(job_id, model, result, created)
    if endpoint == CHAT:
        return {
            "id": f"chatcmpl-{job_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs),
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices()
            ],
            "usage": usage(result),
        }
    return {
        "id": f"cmpl-{job_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": _completion_logprobs(c.logprobs, c.echoed),
                "finish_reason": c.finish_reason,
            }
            for c in result.choices()
        ],
        "usage": usage(result),
    }


def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None

    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {
            **one(e.text, e.logprob),
            "top_logprobs": [one(t, lp) for t, (_, lp) in zip(e.top_text, e.top, strict=True)],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[TokenLogprob] | None, start: int) -> dict[str, Any] | None:
    """The legacy completions shape; text_offset counts characters from the start of the
    choice's text (after an echoed prompt when echo is on)."""
    if entries is None:
        return None
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {t: lp for t, (_, lp) in zip(e.top_text, e.top, strict=True)} for e in entries
        ],
        "text_offset": offsets,
    }


def responses_body(job_id: str, model: str, result: GenResult, created: int) -> dict[str, Any]:
    """The Responses API's `response` object for a /v1/responses line."""
    cut = result.finish_reason == "length"
    reply = result.reply
    return {
        "id": f"resp_{job_id}",
        "object": "response",
        "created_at": created,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "model": model,
        "instructions": reply.get("instructions"),
        "max_output_tokens": reply.get("max_output_tokens"),
        "temperature": reply.get("temperature"),
        "top_p": reply.get("top_p"),
        "text": reply.get("text") or {"format": {"type": "text"}},
        "output": [
            {
                "type": "message",
                "id": f"msg_{job_id}",
                "status": "incomplete" if cut else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": result.text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": {
            "input_tokens": result.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": result.cached_tokens,
                "cache_write_tokens": 0,
            },
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def embedding_body(model: str, result: EmbedResult) -> dict[str, Any]:
    """The OpenAI /v1/embeddings response: one unit vector per input, in input order."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(result.embeddings)
        ],
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


def request_error(exc: RequestError) -> dict[str, Any]:
    return errors.request_error(exc.code, exc.message, exc.param)


server_error = errors.server_error
