"""Prometheus figures of the worker loop: per step (live rows, step time, tokens, prefix reuse)
and per stored job (outcome, queue time, end-to-end latency)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from lmqueue.transitions import Outcome
from worker.metrics import (
    BATCH_DURATION,
    BATCH_SIZE,
    GENERATION_THROUGHPUT,
    GENERATION_TOKENS,
    PROMPT_TOKENS,
    record_outcome,
    record_prefix_reuse,
)
from worker.slot_engine import StepOutput

if TYPE_CHECKING:
    from worker.loop import Waiting


def record_outcomes(model: str, outcomes: list[Outcome], items: list[Waiting]) -> None:
    finished = time.time()
    for o, w in zip(outcomes, items, strict=True):
        record_outcome(model, o.status, w.created_at, w.started_at, finished)
        GENERATION_TOKENS.labels(model).inc(o.completion_tokens or 0)


class StepMetrics:
    """Called after every step; prefix reuse is read as deltas of the engine's counters."""

    def __init__(self, model: str, stats: Any) -> None:
        self.model, self.stats = model, stats
        self._saved = getattr(stats, "prefix_tokens_saved", 0)
        self._rows = getattr(stats, "prefix_rows", 0)

    def __call__(self, out: StepOutput, seconds: float) -> None:
        if out.live:
            BATCH_SIZE.labels(self.model).observe(out.live)
            if seconds > 0:  # one token per live row per decode step
                GENERATION_THROUGHPUT.labels(self.model).set(out.live / seconds)
        BATCH_DURATION.labels(self.model).observe(seconds)
        PROMPT_TOKENS.labels(self.model).inc(out.prefilled)
        saved = getattr(self.stats, "prefix_tokens_saved", 0)
        rows = getattr(self.stats, "prefix_rows", 0)
        if out.prefilled or saved != self._saved:
            record_prefix_reuse(self.model, out.prefilled, saved - self._saved, rows - self._rows)
        self._saved, self._rows = saved, rows
