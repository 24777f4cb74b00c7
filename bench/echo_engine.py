"""A benchmark-only backend that echoes the prompt back: no weights, no tokenizer, no compute.

bench/bulk.py measures the queueing path alone (API -> Redis -> worker -> result store) with it.
It is not part of the product: a worker only uses it when started through `bench.echo_worker`,
which installs it with `worker.runtime.set_backend_factory`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lmqueue.schemas import CompletionBody
from worker.gen_types import GenRequest, GenResult, RequestError
from worker.requests import gen_request
from worker.slot_engine import StepOutput


class _ByteEncoder:
    def encode(self, body: Any) -> list[int]:
        if isinstance(body, CompletionBody):
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        else:
            text = "\n".join(m["content"] for m in body.message_dicts())
        return list(text.encode("utf-8")) or [0]


class EchoBackend:
    """Tokens are the prompt's UTF-8 bytes; the completion is the first max_tokens of them."""

    admit_batch = 1  # no prefill to share

    def __init__(self, name: str, slots: int = 1024):
        self.name, self.slots = name, slots
        self._held: dict[str, GenRequest] = {}

    def prepare(self, endpoint: str, body: dict[str, Any]) -> GenRequest:
        return gen_request(_ByteEncoder(), endpoint, body)

    def capacity(self) -> int:
        return self.slots - len(self._held)

    def admit(self, key: str, request: GenRequest) -> RequestError | None:
        self._held[key] = request
        return None

    def cancel(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._held.pop(key, None)

    def idle(self) -> bool:
        return not self._held

    def step(self) -> StepOutput:
        out = StepOutput(live=len(self._held))
        for key, req in self._held.items():
            ids = req.prompt_ids[: req.max_tokens]
            out.finished.append(
                (
                    key,
                    GenResult(
                        text=bytes(ids).decode("utf-8", "replace"),
                        token_ids=ids,
                        finish_reason="length" if len(req.prompt_ids) > len(ids) else "stop",
                        prompt_tokens=len(req.prompt_ids),
                        completion_tokens=len(ids),
                    ),
                )
            )
        self._held.clear()
        return out
