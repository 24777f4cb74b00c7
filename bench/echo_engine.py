"""A benchmark-only engine that echoes the prompt back: no weights, no tokenizer, no compute.

bench/bulk.py measures the queueing path alone (API -> Redis -> worker -> result store) with it.
It is not part of the product: a worker only uses it when started through `bench.echo_worker`,
which installs it with `worker.loading.set_engine_factory`.
"""

from __future__ import annotations

from typing import Any

import torch

from lmqueue.schemas import CHAT, ChatBody
from worker.engine import Engine, GenRequest, GenResult, RequestError


class EchoEngine(Engine):
    """Tokens are the prompt's UTF-8 bytes; the completion is the first max_tokens of them."""

    def __init__(self, name: str, max_context: int = 1 << 20):  # no super(): there is no model
        self.name = name
        self.max_context = max_context
        self.device = torch.device("cpu")
        self.eos_ids = set()
        self.pad_id = 0
        self.bos_id = None

    def prompt_ids(self, endpoint: str, body: dict[str, Any]) -> list[int]:
        if endpoint == CHAT:
            text = "\n".join(m["content"] for m in ChatBody.model_validate(body).message_dicts())
        else:
            prompt = body.get("prompt")
            text = prompt[0] if isinstance(prompt, list) else str(prompt)
        return list(text.encode("utf-8")) or [0]

    def generate(self, requests: list[GenRequest]) -> list[GenResult | RequestError]:
        out: list[GenResult | RequestError] = []
        for req in requests:
            ids = req.prompt_ids[: req.max_tokens]
            out.append(
                GenResult(
                    text=bytes(ids).decode("utf-8", "replace"),
                    token_ids=ids,
                    finish_reason="length" if len(req.prompt_ids) > len(ids) else "stop",
                    prompt_tokens=len(req.prompt_ids),
                    completion_tokens=len(ids),
                )
            )
        return out
