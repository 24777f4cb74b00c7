"""Turns a micro-batch of work items into engine calls and stored outcomes.

Rows are prepared one by one (a bad request fails alone), sorted by prompt length and cut into
length buckets (`worker.buckets`: rows, prefill-token budget, bounded padding waste), and every
chunk's outcomes are written to the store in one transaction. Embedding jobs go to the
`EmbedEngine`, which batches their inputs itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmqueue.db import session_scope
from lmqueue.schemas import ChatBody, CompletionBody, parse_body
from lmqueue.tables import new_id
from lmqueue.transitions import Outcome, store_outcomes, time_out
from worker.batcher import WorkItem
from worker.buckets import plan_buckets
from worker.embedding import EmbedEngine, EmbedRequest, EmbedResult
from worker.engine import Engine, GenRequest, GenResult, RequestError
from worker.faults import free_cached_memory, is_out_of_memory
from worker.metrics import record_microbatch, record_outcome, record_prefix_reuse
from worker.responses import completion_body, embedding_body, request_error, server_error

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    item: WorkItem
    request: GenRequest | EmbedRequest


def to_gen_request(engine: Engine, item: WorkItem) -> GenRequest:
    body = parse_body(item.endpoint, item.body)
    assert isinstance(body, CompletionBody | ChatBody)
    max_tokens = body.max_tokens if isinstance(body, CompletionBody) else body.new_tokens()
    return GenRequest(
        prompt_ids=engine.prompt_ids(item.endpoint, item.body),
        max_tokens=max_tokens or 16,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
    )


def to_request(engine: Engine | EmbedEngine, item: WorkItem) -> GenRequest | EmbedRequest:
    if isinstance(engine, EmbedEngine):
        return engine.request(item.endpoint, item.body)
    return to_gen_request(engine, item)


def _prompt_len(row: Prepared) -> int:
    assert isinstance(row.request, GenRequest)
    return len(row.request.prompt_ids)


def chunk_by_tokens(
    rows: Sequence[Prepared], max_rows: int, max_tokens: int, max_waste: float = 1.0
) -> Iterator[list[Prepared]]:
    """Cut length-sorted rows into buckets: rows, prefill-token budget, padding waste."""
    for bucket in plan_buckets([_prompt_len(r) for r in rows], max_rows, max_tokens, max_waste):
        yield [rows[i] for i in bucket]


def plan_chunks(
    rows: Sequence[Prepared], max_rows: int, max_tokens: int, max_waste: float
) -> list[list[Prepared]]:
    """Sort generation rows by prompt length and cut them into buckets (worker.buckets)."""
    return list(chunk_by_tokens(sorted(rows, key=_prompt_len), max_rows, max_tokens, max_waste))


class BatchRunner:
    def __init__(
        self,
        engine: Engine | EmbedEngine,
        model: str,
        worker: str,
        max_rows: int,
        max_tokens: int,
        max_waste: float = 1.0,
    ):
        self.engine, self.model, self.worker = engine, model, worker
        self.max_rows, self.max_tokens, self.max_waste = max_rows, max_tokens, max_waste

    def __call__(self, items: list[WorkItem]) -> None:
        by_id = {item.job_id: item for item in items}
        t = time.time()
        expired = [i for i in items if i.deadline_at is not None and t > i.deadline_at]
        self._time_out(expired, t)
        rows, failed = self._prepare([i for i in items if i not in expired])
        if failed:
            self._store(failed, by_id)
        for chunk in self._chunks(rows):
            self._store(self._generate_split_on_error(chunk), by_id)

    def _chunks(self, rows: list[Prepared]) -> Iterator[list[Prepared]]:
        if isinstance(self.engine, EmbedEngine):  # it buckets the inputs of its jobs itself
            for start in range(0, len(rows), self.max_rows):
                yield rows[start : start + self.max_rows]
            return
        yield from plan_chunks(rows, self.max_rows, self.max_tokens, self.max_waste)

    def _prepare(self, items: list[WorkItem]) -> tuple[list[Prepared], list[Outcome]]:
        rows: list[Prepared] = []
        failed: list[Outcome] = []
        for item in items:
            try:
                rows.append(Prepared(item, to_request(self.engine, item)))
            except RequestError as exc:
                failed.append(Outcome(item.job_id, error=request_error(exc)))
            except Exception as exc:  # never let one bad body fail its batch-mates
                log.exception("preparing job %s failed", item.job_id)
                failed.append(Outcome(item.job_id, error=server_error("prepare_failed", str(exc))))
        return rows, failed

    def _generate_split_on_error(self, chunk: list[Prepared]) -> list[Outcome]:
        """Run a chunk; if the call itself fails (out of memory, a kernel error), split it in
        half and retry, down to one row, so only the row that really fails gets an error.
        Out of memory first frees the allocator's cached blocks, so the halves can use them."""
        try:
            return self._generate(chunk)
        except Exception as exc:
            oom = is_out_of_memory(exc)
            if oom:
                free_cached_memory()
                self.engine.stats.oom_splits += 1
            if len(chunk) == 1:
                log.exception("generate failed for job %s", chunk[0].item.job_id)
                code = "out_of_memory" if oom else "engine_error"
                return [Outcome(chunk[0].item.job_id, error=server_error(code, str(exc)))]
            what = "ran out of memory" if oom else "failed"
            log.warning("generate %s on %d rows (%s); splitting", what, len(chunk), exc)
            mid = len(chunk) // 2
            return self._generate_split_on_error(chunk[:mid]) + self._generate_split_on_error(
                chunk[mid:]
            )

    def _generate(self, chunk: list[Prepared]) -> list[Outcome]:
        microbatch_id = new_id("mb")
        stats = getattr(self.engine, "stats", None)
        saved0, rows0 = (stats.prefix_tokens_saved, stats.prefix_rows) if stats else (0, 0)
        t0 = time.perf_counter()
        results = self._run_engine([r.request for r in chunk])
        seconds = time.perf_counter() - t0
        if stats is not None and isinstance(self.engine, Engine):
            record_prefix_reuse(
                self.model,
                sum(_input_tokens(r.request) for r in chunk),
                stats.prefix_tokens_saved - saved0,
                stats.prefix_rows - rows0,
            )
        log.info(
            "%s: %d rows, longest input %d tokens, %.2f s",
            "embed" if isinstance(self.engine, EmbedEngine) else "generate",
            len(chunk),
            max(_input_tokens(r.request) for r in chunk),
            seconds,
        )
        outcomes = []
        for row, res in zip(chunk, results, strict=True):
            o = Outcome(row.item.job_id, microbatch_id=microbatch_id, microbatch_size=len(chunk))
            if isinstance(res, GenResult):
                o.result = completion_body(row.item.job_id, row.item.endpoint, self.model, res)
                o.prompt_tokens, o.completion_tokens = res.prompt_tokens, res.completion_tokens
            elif isinstance(res, EmbedResult):
                o.result = embedding_body(self.model, res)
                o.prompt_tokens, o.completion_tokens = res.prompt_tokens, 0
            else:
                o.error = request_error(res)
            outcomes.append(o)
        record_microbatch(
            self.model,
            len(chunk),
            sum(o.prompt_tokens or 0 for o in outcomes),
            sum(o.completion_tokens or 0 for o in outcomes),
            seconds,
        )
        return outcomes

    def _run_engine(
        self, requests: list[GenRequest | EmbedRequest]
    ) -> Sequence[GenResult | EmbedResult | RequestError]:
        if isinstance(self.engine, EmbedEngine):
            embeds = [r for r in requests if isinstance(r, EmbedRequest)]
            return self.engine.embed(embeds, self.max_tokens)
        return self.engine.generate([r for r in requests if isinstance(r, GenRequest)])

    def _time_out(self, items: list[WorkItem], t: float) -> None:
        """Jobs past their deadline before they ran fail as the reaper would fail them."""
        if not items:
            return
        with session_scope() as session:
            failed = set(time_out(session, t, [i.job_id for i in items]))
        for item in items:
            if item.job_id in failed:
                record_outcome(self.model, "failed", item.created_at, item.started_at, t)

    def _store(self, outcomes: list[Outcome], items: dict[str, WorkItem]) -> None:
        with session_scope() as session:
            store_outcomes(session, outcomes, self.worker)
        finished = time.time()
        for o in outcomes:
            item = items.get(o.job_id)
            created, started = (item.created_at, item.started_at) if item else (None, None)
            record_outcome(self.model, o.status, created, started, finished)


def _input_tokens(request: GenRequest | EmbedRequest) -> int:
    """The longest token sequence a request feeds the model (for the per-call log line)."""
    if isinstance(request, EmbedRequest):
        return max((len(ids) for ids in request.inputs), default=0)
    return len(request.prompt_ids)
