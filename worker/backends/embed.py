"""The embeddings path behind the backend seam: every step embeds all the requests it holds
in one batched call (`EmbedEngine.embed` buckets their inputs by length itself)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from worker.embedding import EmbedEngine, EmbedRequest
from worker.gen_types import RequestError
from worker.slot_engine import StepOutput


class EmbedBackend:
    def __init__(self, engine: EmbedEngine, max_rows: int, max_tokens: int):
        self.engine, self.max_rows, self.max_tokens = engine, max(1, max_rows), max_tokens
        self.name = engine.name
        self._held: dict[str, EmbedRequest] = {}
        self._cancel: set[str] = set()

    def prepare(self, endpoint: str, body: dict[str, Any]) -> EmbedRequest:
        return self.engine.request(endpoint, body)

    admit_batch = 1  # one encoder call per step: nothing to gain from waiting

    def capacity(self) -> int:
        return self.max_rows - len(self._held)

    def admit(self, key: str, request: EmbedRequest) -> RequestError | None:
        self._held[key] = request
        return None

    def cancel(self, keys: Iterable[str]) -> None:
        self._cancel.update(keys)

    def idle(self) -> bool:
        return not self._held

    def step(self) -> StepOutput:
        out = StepOutput()
        for key in self._cancel & set(self._held):
            del self._held[key]
            out.dropped.append(key)
        self._cancel.clear()
        if not self._held:
            return out
        keys, requests = list(self._held), list(self._held.values())
        self._held.clear()
        results = self.engine.embed(requests, self.max_tokens)
        out.finished = list(zip(keys, results, strict=True))
        out.live = len(keys)
        return out
