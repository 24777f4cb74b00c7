"""Small pieces of the worker loop: outcome bodies, the token hook type, step statistics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmqueue.transitions import Outcome
from worker.embedding import EmbedResult
from worker.gen_types import GenResult, RequestError, TokenEvent
from worker.responses import completion_body, embedding_body, request_error, server_error
from worker.slot_engine import StepOutput

# Called once per step with the new text of every streaming row (a no-op by default): the
# streaming publisher plugs in here without touching the loop.
TokenHook = Callable[[list[TokenEvent]], None]
# Per-row errors that are the worker's fault, not the request's (stored as 500s).
SERVER_CODES = {"out_of_memory", "engine_error"}


def finished_outcome(
    job_id: str, endpoint: str, model: str, res: GenResult | EmbedResult | RequestError
) -> Outcome:
    if isinstance(res, GenResult):
        o = Outcome(job_id, result=completion_body(job_id, endpoint, model, res))
        o.prompt_tokens, o.completion_tokens = res.prompt_tokens, res.completion_tokens
        # "microbatch" now means: the rows prefilled in the same step (id) and the most rows
        # this job decoded alongside (size).
        o.microbatch_id, o.microbatch_size = f"step{res.admitted_step}", res.batch_rows
        return o
    if isinstance(res, EmbedResult):
        o = Outcome(job_id, result=embedding_body(model, res))
        o.prompt_tokens, o.completion_tokens = res.prompt_tokens, 0
        return o
    if res.code in SERVER_CODES:
        return Outcome(job_id, error=server_error(res.code, res.message))
    return Outcome(job_id, error=request_error(res))


def engine_error(message: str) -> dict[str, Any]:
    return server_error("engine_error", message)


@dataclass
class StepStats:
    """Live rows and time per step since the worker started (read by metrics and benches)."""

    steps: int = 0
    decode_steps: int = 0
    live_rows: int = 0  # summed over decode steps
    seconds: float = 0.0
    prefill_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, out: StepOutput, seconds: float) -> None:
        with self._lock:
            self.steps += 1
            self.seconds += seconds
            self.prefill_tokens += out.prefilled
            if out.live:
                self.decode_steps += 1
                self.live_rows += out.live

    def mean_live(self) -> float:
        return self.live_rows / self.decode_steps if self.decode_steps else 0.0
