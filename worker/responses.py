"""OpenAI-shaped response bodies and error objects built from engine results."""

from __future__ import annotations

import time
from typing import Any

from lmqueue import errors
from lmqueue.schemas import CHAT
from worker.embedding import EmbedResult
from worker.engine import GenResult, RequestError


def usage(result: GenResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def completion_body(job_id: str, endpoint: str, model: str, result: GenResult) -> dict[str, Any]:
    created = int(time.time())
    if endpoint == CHAT:
        return {
            "id": f"chatcmpl-{job_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
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
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
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
