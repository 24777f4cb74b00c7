"""The continuous-batching loop's engine: decode slots that requests join and leave every step.

Each `step()`:
1. drops cancelled rows (their slots free at once);
2. admits waiting rows into free slots: their prompts are prefilled within a per-step token
   budget (a prompt longer than the budget is prefilled a chunk per step), their first token is
   sampled, and their KV joins the slot cache;
3. runs one decode step for every live row; rows that finish leave their slot.

A step that admits plain rows (no chunked or shared-prefix prefill) while others decode runs
steps 2 and 3 as one packed forward (worker.packed): the admitted rows then decode from the
next step on.

Out of memory inside a forward is handled outside the `except` block (the traceback holds the
failed call's tensors until it is left): the newest rows are preempted back to waiting, their KV
dropped and recomputed later, and the slot count is lowered; a row fails with `out_of_memory`
only when it cannot run alone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from worker.choices import Choices
from worker.faults import free_cached_memory, is_out_of_memory
from worker.gen_types import NUMERICAL_ERROR, GenRequest, GenResult, RequestError, TokenEvent
from worker.kv_slots import SlotCache
from worker.packed import PackedOut, packed_forward
from worker.prefill import ChunkedPrefill, Group, Prefilled, plan_groups, prefill_group
from worker.requests import gen_request
from worker.rows import Row, new_row, push, result, stream_delta
from worker.sampling import sample

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    # (key, GenResult | RequestError), or an EmbedResult from the embeddings backend
    finished: list[tuple[str, Any]] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # cancelled rows that left
    live: int = 0  # rows that decoded this step
    prefilled: int = 0  # prompt tokens computed this step


class SlotEngine:
    def __init__(self, engine: Engine, slots: int, prefill_budget: int, admit_batch: int = 0):
        self.engine = engine
        self.slots = max(1, slots)
        self.prefill_budget = max(1, prefill_budget)
        self._admit_batch = admit_batch  # 0 = slots // 8 (Settings.admit_batch)
        self.cache = SlotCache(engine.model.config, self.slots)
        self.live: list[Row] = []  # row i <-> slot-cache row i
        self.waiting: deque[Row] = deque()  # admitted, not yet prefilled
        self.chunked: ChunkedPrefill | None = None
        self._cancel: set[str] = set()
        self._seq = 0
        self.steps = 0
        self._choices = Choices()  # n > 1 requests: their choices, gathered

    # ---- the caller's side ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def stats(self) -> Any:
        return self.engine.stats

    def prepare(self, endpoint: str, body: dict[str, Any]) -> GenRequest:
        return gen_request(self.engine, endpoint, body)

    @property
    def admit_batch(self) -> int:
        """Free slots that make an admission worth its prefill forward while rows decode
        (at most the slot count, which out-of-memory handling may have lowered)."""
        return max(1, min(self._admit_batch or self.slots // 8, self.slots))

    def capacity(self) -> int:
        """Requests this engine can take now without exceeding its slots."""
        held = len(self.live) + len(self.waiting) + (1 if self.chunked else 0)
        return max(0, self.slots - held)

    def admit(self, key: str, req: GenRequest) -> RequestError | None:
        """Queue a request for its prefill; a request it can never run is refused at once."""
        err = self.engine.check(req)
        if err is not None:
            return err
        limit = min(req.max_tokens, self.engine.max_context - len(req.prompt_ids))
        # n choices are n rows under the same key, admitted together so that their common
        # prompt is computed once (worker.prefill's shared-prefix groups); their results are
        # gathered into one answer (worker.choices).
        for index in range(max(1, req.n)):
            self._seq += 1
            self.waiting.append(new_row(key, req, limit, index, self._seq))
        self._choices.start(key, req.n)
        return None

    def cancel(self, keys: Iterable[str]) -> None:
        self._cancel.update(keys)

    def idle(self) -> bool:
        return not (self.live or self.waiting or self.chunked or self._choices.abandoned)

    def keys(self) -> list[str]:
        rows = [*self.live, *self.waiting] + ([self.chunked.row] if self.chunked else [])
        return list(dict.fromkeys(r.key for r in rows))

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> StepOutput:
        out = StepOutput()
        self.steps += 1
        with torch.inference_mode():
            self._drop_cancelled(out)
            if not self._packed_step(out):
                self._admit(out)
                if self.live:
                    self._decode(out)
        return out

    def _drop_cancelled(self, out: StepOutput) -> None:
        if not (self._cancel or self._choices.abandoned):
            return
        gone, cancelled = self._cancel | self._choices.abandoned, self._cancel
        self._cancel, self._choices.abandoned = set(), set()
        for i in reversed(range(len(self.live))):
            if self.live[i].key in gone:
                out.dropped.append(self.live[i].key)
                self._leave(i)
        kept = [r for r in self.waiting if r.key not in gone]
        out.dropped += [r.key for r in self.waiting if r.key in gone]
        self.waiting = deque(kept)
        if self.chunked and self.chunked.row.key in gone:
            out.dropped.append(self.chunked.row.key)
            self.chunked = None
        # One key per request, whatever its n; a failed request's leftover choices silently.
        out.dropped = [k for k in dict.fromkeys(out.dropped) if k in cancelled]
        for key in gone:
            self._choices.forget(key)

    def _admit(self, out: StepOutput) -> None:
        budget = self.prefill_budget
        ready: list[Prefilled] = []
        if self.chunked is not None:  # a long prompt in progress takes this step's budget
            self._advance_chunk(ready, budget, out)
            budget = 0
        free = self.cache.free - len(ready)
        admitting = budget > 0 and not self._hold(free)
        take = self._take(budget, free) if admitting else []
        if admitting and not take and free > 0 and self.waiting:  # the head exceeds the budget
            self.chunked = ChunkedPrefill(self.engine, self.waiting.popleft())
            self._advance_chunk(ready, budget, out)
        for group in plan_groups(self.engine, take) if take else []:
            ready += self._prefill(group, out)
        if ready:
            self._join(ready, out)

    def _hold(self, free: int) -> bool:
        """While rows decode, admit only once a few slots are free: one prefill for several
        rows rather than one per row."""
        return bool(self.live) and free < min(self.admit_batch, len(self.waiting))

    def _take(self, budget: int, free: int) -> list[Row]:
        """The waiting rows this step admits, in order: as many as fit the free slots and the
        prefill budget."""
        take: list[Row] = []
        while self.waiting and len(take) < free:
            n = len(self.waiting[0].req.prompt_ids)
            if n > budget:
                break  # the rest waits for the next step's budget
            take.append(self.waiting.popleft())
            budget -= n
        return take

    def _packed_step(self, out: StepOutput) -> bool:
        """Decode the live rows and prefill this step's admissions in one forward
        (worker.packed). False when this step cannot: nothing live or nothing to admit, a
        chunked or shared-prefix prefill, out of memory; the two-forward path then runs."""
        eng, free = self.engine, self.cache.free
        if not (eng.packed_steps and self.live and self.waiting) or self.chunked:
            return False
        if self._hold(free):  # no admission this step: a plain decode
            return False
        take = self._take(self.prefill_budget, free)
        groups = plan_groups(eng, take) if take else []
        if not take or any(g.prefix for g in groups):
            self.waiting.extendleft(reversed(take))
            return False
        rows = [r for g in groups for r in g.rows]

        def forward() -> PackedOut:
            self.cache.reserve(1)
            last = [r.tokens[-1] for r in self.live]
            return packed_forward(eng, self.cache, last, [r.req.prompt_ids for r in rows])

        res = self._try(forward, out)
        if isinstance(res, _Failed):  # the two-forward path preempts or splits
            self.waiting.extendleft(reversed(take))
            return False
        n = len(self.live)
        self._decoded(res.logits[:n], out)
        prompt_tokens = sum(len(r.req.prompt_ids) for r in rows)
        eng.stats.prefill_tokens += prompt_tokens
        eng.stats.packed_steps += 1
        out.prefilled += prompt_tokens
        firsts = zip(rows, res.logits[n:], res.kv, strict=True)  # each prompt's last token
        self._join([Prefilled(r, logits, kv) for r, logits, kv in firsts], out)
        return True

    def _advance_chunk(self, ready: list[Prefilled], budget: int, out: StepOutput) -> None:
        chunked = self.chunked
        assert chunked is not None
        res = self._try(lambda: chunked.advance(budget), out)
        if isinstance(res, _Failed):
            self._fail(chunked.row, res.exc, out)
            self.chunked = None
        elif res is not None:
            out.prefilled += len(chunked.row.req.prompt_ids)
            ready.append(res)
            self.chunked = None

    def _prefill(self, group: Group, out: StepOutput) -> list[Prefilled]:
        """Prefill a group; out of memory splits it (down to one row, which then fails)."""
        res = self._try(lambda: prefill_group(self.engine, group), out)
        if not isinstance(res, _Failed):
            out.prefilled += sum(len(r.req.prompt_ids) for r in group.rows)
            return res or []
        if len(group.rows) == 1:
            self._fail(group.rows[0], res.exc, out)
            return []
        mid = len(group.rows) // 2
        return self._prefill(Group(group.rows[:mid]), out) + self._prefill(
            Group(group.rows[mid:]), out
        )

    def _join(self, ready: list[Prefilled], out: StepOutput) -> None:
        rows = [p.row for p in ready]
        logits = torch.stack([p.logits for p in ready])  # [b, V]
        self._sample(rows, logits, out)
        joining = [p for p in ready if not p.row.finished]
        for p in ready:
            p.row.admitted_step = self.steps
        # Room for the longest joining row first: one move of the window, not one per row
        # longer than the last. Moving may make bigger buffers and the first join makes them:
        # allocations that can run out of memory; the rows not yet joined then wait for fewer
        # slots.
        longest = max((p.kv[0][0].shape[1] for p in joining), default=0)
        room = self._try(partial(self.cache.make_room, longest), out)
        if isinstance(room, _Failed):
            self._requeue([p.row for p in joining], room.exc, out)
            return
        for n, p in enumerate(joining):
            res = self._try(partial(self.cache.join, p.kv), out)
            if isinstance(res, _Failed):
                self._requeue([q.row for q in joining[n:]], res.exc, out)
                return
            self.live.append(p.row)

    def _decode(self, out: StepOutput) -> None:
        eng = self.engine
        tok = torch.tensor([[r.tokens[-1]] for r in self.live], device=eng.device)  # [n, 1]

        def forward() -> torch.Tensor:
            # reserve() may move the KV into bigger buffers: an allocation that can run out of
            # memory like the forward itself, so it is preempted the same way.
            self.cache.reserve(1)
            mask, pos = self.cache.mask_and_positions(1, eng.device)  # [n, W + 1], [n, 1]
            return eng.forward(tok, mask, pos, self.cache.cache)

        res = self._try(forward, out)
        if isinstance(res, _Failed):
            self._preempt(res.exc, out)
            return
        self._decoded(res, out)

    def _decoded(self, logits: torch.Tensor, out: StepOutput) -> None:
        """The live rows' decode logits [n, V] are in: advance, sample, drop finished rows."""
        self.cache.advance(1)
        out.live = n = len(self.live)
        for row in self.live:
            row.batch_rows = max(row.batch_rows, n)
        self._sample(list(self.live), logits, out)
        for i in reversed(range(len(self.live))):
            if self.live[i].finished:
                self._leave(i)

    def _sample(self, rows: list[Row], logits: torch.Tensor, out: StepOutput) -> None:
        eng = self.engine
        s = sample(logits, rows)  # [b], [b], b entries
        for row, t, is_bad, lp in zip(
            rows, s.tokens.tolist(), s.bad.tolist(), s.logprobs, strict=True
        ):
            if is_bad:
                row.error = RequestError(
                    NUMERICAL_ERROR,
                    f"model {eng.name!r} produced NaN/inf logits for this request",
                )
            else:
                kept = len(row.tokens)
                push(row, t, eng.eos_ids, eng.decode_text)
                if lp is not None and len(row.tokens) > kept:  # EOS is not an output token
                    row.logprobs.append(lp)
            if row.req.stream:
                out.events.append(TokenEvent(row.key, stream_delta(row), row.completion_tokens))
            if row.finished:
                self._finished(row, result(row, eng.decode_text), out)

    def _finished(self, row: Row, res: GenResult | RequestError, out: StepOutput) -> None:
        out.finished += self._choices.finished(row, res)

    def _leave(self, i: int) -> None:
        err = self.live[i].error
        self.cache.leave(i, scrub=err is not None and err.code == NUMERICAL_ERROR)
        last = self.live.pop()
        if i < len(self.live):
            self.live[i] = last

    # ---- out of memory --------------------------------------------------------------------

    def _try(self, fn, out: StepOutput):  # type: ignore[no-untyped-def]
        """Run fn; an out-of-memory error comes back as _Failed, after the except block is
        left, so the failed call's tensors are gone before memory is freed."""
        try:
            return fn()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Keep the message only: the exception's traceback holds the failed call's frames
            # and with them its tensors.
            message = f"{type(exc).__name__}: {exc}"
        free_cached_memory()  # outside the except block, so those tensors are gone by now
        self.engine.stats.oom_splits += 1
        return _Failed(message)

    def _preempt(self, exc: str, out: StepOutput) -> None:
        """The decode step ran out of memory: preempt the newest half of the live rows back to
        waiting (KV dropped, recomputed later) and lower the slot count to what ran."""
        if len(self.live) == 1:
            self._fail(self.live[0], exc, out)
            self._leave(0)
            return
        order = sorted(range(len(self.live)), key=lambda i: self.live[i].admitted_seq)
        victims = sorted(order[len(order) // 2 :], reverse=True)
        rows = [self.live[i] for i in victims]
        for i in victims:
            self._leave(i)
        for row in sorted(rows, key=lambda r: r.admitted_seq, reverse=True):
            row.reset()
            self.waiting.appendleft(row)
        self.slots = max(1, len(self.live))
        self.cache.shrink(self.slots)
        log.warning(
            "out of memory at %d rows: %d preempted, slots now %d",
            len(self.live) + len(rows),
            len(rows),
            self.slots,
        )

    def _requeue(self, rows: list[Row], exc: str, out: StepOutput) -> None:
        """Prefilled rows found no memory to join the slots: back to waiting, and the slot
        count lowered to the live rows, or halved when none are live (the buffers are then
        made anew, at the lower count)."""
        if not self.live and self.slots == 1:
            self._fail(rows[0], exc, out)  # alone, with nothing else holding memory
            rows = rows[1:]
        for row in reversed(rows):
            row.reset()
            self.waiting.appendleft(row)
        self.slots = len(self.live) if self.live else max(1, self.slots // 2)
        self.cache.shrink(self.slots)
        log.warning(
            "out of memory joining the slots: %d rows wait, slots now %d", len(rows), self.slots
        )

    def _fail(self, row: Row, exc: str, out: StepOutput) -> None:
        log.error("request %s ran out of memory alone: %s", row.key, exc)
        row.error = RequestError(
            "out_of_memory", f"out of memory running this request alone: {exc}"
        )
        self._finished(row, row.error, out)


@dataclass
class _Failed:
    exc: str  # what the out-of-memory error said
