"""The second generation backend: transformers' own continuous batching
(`model.init_continuous_batching()`, a `ContinuousBatchingManager` with paged attention).

The manager schedules on its own background thread; this backend hands it requests (`admit`),
and each `step()` collects what it streamed since the last step (blocking briefly for the first
output, so an idle loop does not spin). Every token goes through the same per-row bookkeeping as
the slot loop (`worker.rows.push`): EOS, `max_tokens` and stop strings end a row the same way,
and the result text is trimmed the same way. The manager knows no stop strings, so a row whose
streamed text reaches one is cancelled in the manager at once.

What the manager cannot do per request is refused per row, naming the field: sampling (one
`do_sample` for the whole manager; greedy here), `seed` (one global seed), and any other request
field left at a non-default value (penalties, logprobs... when the request grows them).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from worker.gen_types import GenRequest, RequestError, TokenEvent
from worker.requests import gen_request
from worker.rows import Row, push, result, stream_delta
from worker.slot_engine import StepOutput

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)

ENGINE = "hf-paged"
# Fields of a GenRequest this backend honours; every other field must keep its default.
# `temperature` and `top_p` are checked on their own (greedy only: temperature 0, any top_p).
HONOURED = {"prompt_ids", "max_tokens", "stop", "stream", "temperature", "top_p"}
POLL_S = 0.05  # the longest one step waits for the manager's next output
PAGE_SIZE = 64  # tokens per KV page
# On CPU the KV pages are sized for every slot at min(max_context, this) tokens: transformers
# would otherwise take 60% of the machine's free RAM. A longer row still runs (the manager
# evicts and recomputes rows when its pages run out). On CUDA transformers sizes the pages
# from free device memory itself.
CPU_TOKENS_PER_ROW = 2048


class HFPagedBackend:
    admit_batch = 1  # the manager schedules its own prefills

    def __init__(self, engine: Engine, slots: int, prefill_budget: int = 1024):
        self.engine = engine
        self.slots = max(1, slots)
        self.prefill_budget = max(16, prefill_budget)
        self.steps = 0
        self._rows: dict[str, Row] = {}  # admitted, not finished or dropped
        self._seen: dict[str, int] = {}  # tokens of each row already pushed
        # The manager's request id of each row: unique per admission, so a late output of a
        # cancelled request never lands on a later row with the same key.
        self._rid: dict[str, str] = {}
        self._by_rid: dict[str, str] = {}
        self._seq = 0
        self._cancel: set[str] = set()
        self._lock = threading.Lock()  # admit/cancel may come from another thread than step
        self._manager: Any = None

    # ---- the caller's side ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def stats(self) -> Any:
        return self.engine.stats

    def prepare(self, endpoint: str, body: dict[str, Any]) -> GenRequest:
        req = gen_request(self.engine, endpoint, body)
        err = self.refusal(req)
        if err is not None:
            raise err
        return req

    def refusal(self, req: GenRequest) -> RequestError | None:
        """The first request field this backend cannot honour, as a per-row 400 error."""
        if req.temperature > 0:
            return _unsupported(
                "temperature",
                f"sampling (temperature {req.temperature:g}); send temperature 0 for greedy "
                "decoding",
            )
        for f in dataclasses.fields(GenRequest):
            if f.name in HONOURED:
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            value = getattr(req, f.name)
            if value != default:
                return _unsupported(f.name, f"{f.name!r} ({value!r})")
        return None

    def capacity(self) -> int:
        with self._lock:
            return max(0, self.slots - len(self._rows))

    def admit(self, key: str, req: GenRequest) -> RequestError | None:
        err = self.engine.check(req) or self.refusal(req)
        if err is not None:
            return err
        limit = min(req.max_tokens, self.engine.max_context - len(req.prompt_ids))
        row = Row(key, req, limit, generator=None)
        with self._lock:
            self._seq += 1
            rid = f"{key}#{self._seq}"
            self._rows[key], self._seen[key] = row, 0
            self._rid[key], self._by_rid[rid] = rid, key
        self._ensure_manager().add_request(
            list(req.prompt_ids),
            request_id=rid,
            max_new_tokens=limit,
            # Token by token only where we watch the text: per-token outputs cost Python time.
            streaming=bool(req.stop or req.stream),
            eos_token_id=sorted(self.engine.eos_ids) or -1,
        )
        self.engine.stats.rows += 1
        self.engine.stats.prompt_tokens += len(req.prompt_ids)
        return None

    def cancel(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._cancel.update(keys)

    def idle(self) -> bool:
        with self._lock:
            return not self._rows and not self._cancel

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._rows)

    def close(self) -> None:
        """Stop the manager's thread (the next admit starts a new one)."""
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, timeout=5)

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> StepOutput:
        out = StepOutput()
        self.steps += 1
        self._drop_cancelled(out)
        with self._lock:
            if not self._rows:
                return out
        for res in self._collect():
            self._take(res, out)
        with self._lock:  # the rows that decoded in this step, those that just finished included
            out.live = len(self._rows) + len(out.finished)
        return out

    def _drop_cancelled(self, out: StepOutput) -> None:
        with self._lock:
            gone, self._cancel = self._cancel, set()
            dropped = [k for k in gone if k in self._rows]
            rids = [self._forget(k) for k in dropped]
        for key, rid in zip(dropped, rids, strict=True):
            self._manager.cancel_request(rid)
            out.dropped.append(key)

    def _collect(self) -> list[Any]:
        """What the manager streamed since the last step: wait up to POLL_S for the first."""
        manager = self._manager
        first = manager.get_result(timeout=POLL_S)
        if first is None:
            self._check_alive()
            return []
        outputs = [first]
        while (more := manager.get_result(timeout=0)) is not None:
            outputs.append(more)
        return outputs

    def _check_alive(self) -> None:
        """The manager's thread died: fail what it held (the loop fails the running rows) and
        start a fresh manager at the next admission."""
        manager = self._manager
        status = manager.background_thread_status
        if manager.is_running() and status.fatal_error is None:
            return
        self._manager = None
        with self._lock:
            for key in list(self._rows):
                self._forget(key)
        raise RuntimeError(f"transformers' continuous batching stopped: {status.fatal_error}")

    def _take(self, res: Any, out: StepOutput) -> None:
        """Push the tokens a streamed output adds to its row; finish or fail the row."""
        with self._lock:
            key = self._by_rid.get(res.request_id, "")
            row = self._rows.get(key)
            if row is None:  # cancelled or already finished (e.g. on a stop string)
                return
            new = list(res.generated_tokens[self._seen[key] :])
            self._seen[key] += len(new)
            n_live = len(self._rows)
        eng = self.engine
        if new and not row.tokens and row.completion_tokens == 0:
            row.admitted_step = self.steps
            out.prefilled += len(row.req.prompt_ids)
        row.batch_rows = max(row.batch_rows, n_live)
        for token in new:
            if push(row, token, eng.eos_ids, eng.decode_text):
                break
        if res.error is not None and not row.finished:
            row.error = RequestError("engine_error", f"{ENGINE} failed this request: {res.error}")
        elif res.is_finished() and not row.finished:  # a limit the manager applied itself
            row.finish_reason = "length"
        if row.req.stream:
            out.events.append(TokenEvent(key, stream_delta(row), row.completion_tokens))
        if not row.finished:
            return
        if not res.is_finished():  # a stop string the manager does not know about
            self._manager.cancel_request(res.request_id)
        with self._lock:
            self._forget(key)
        out.finished.append((key, result(row, eng.decode_text)))

    def _forget(self, key: str) -> str:
        """Remove a row (the lock held); returns its manager request id."""
        del self._rows[key], self._seen[key]
        rid = self._rid.pop(key)
        del self._by_rid[rid]
        return rid

    # ---- the manager ----------------------------------------------------------------------

    def _ensure_manager(self) -> Any:
        if self._manager is None:
            self._manager = self._start_manager()
        return self._manager

    def _start_manager(self) -> Any:
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        eng = self.engine
        num_blocks = None
        if eng.device.type == "cpu":
            num_blocks = self.slots * -(-min(eng.max_context, CPU_TOKENS_PER_ROW) // PAGE_SIZE) + 1
        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=num_blocks,
            max_batch_tokens=self.prefill_budget + self.slots,
            max_requests_per_batch=self.slots,
            # Our rows come one by one; prefix sharing between them is the slot loop's feature.
            allow_block_sharing=False,
            # A fixed seed: the manager seeds torch's global generator with it, and greedy
            # decoding draws nothing, so any value gives the same outputs.
            seed=0,
        )
        gen_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=eng.max_context,
            eos_token_id=sorted(eng.eos_ids) or None,
            pad_token_id=eng.pad_id,
        )
        manager = eng.model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        with torch.inference_mode():  # the manager's thread runs in the caller's mode
            manager.start()
        log.info("%s: transformers continuous batching started for %s", ENGINE, eng.name)
        return manager


def _unsupported(param: str, what: str) -> RequestError:
    return RequestError(
        "unsupported_parameter",
        f'engine "{ENGINE}" does not support {what}; serve this model with engine = "lmqueue" '
        "for it",
        param,
    )
