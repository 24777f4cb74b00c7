"""Turns a micro-batch of work items into engine calls and stored outcomes.

Rows are prepared one by one (a bad request fails alone), sorted by prompt length to cut
padding, split so no generate() call exceeds the prefill-token budget, and every chunk's
outcomes are written to the store in one transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmqueue.db import session_scope
from lmqueue.jobs import Outcome, store_outcomes
from lmqueue.metrics import record_microbatch, record_outcome
from lmqueue.models import new_id
from lmqueue.schemas import ChatBody, CompletionBody, parse_body
from worker.batcher import WorkItem
from worker.engine import Engine, GenRequest, GenResult, RequestError
from worker.responses import completion_body, request_error, server_error

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    item: WorkItem
    request: GenRequest


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


def chunk_by_tokens(
    rows: Sequence[Prepared], max_rows: int, max_tokens: int
) -> Iterator[list[Prepared]]:
    """Split length-sorted rows so that rows x longest prompt stays within the token budget."""
    chunk: list[Prepared] = []
    for row in rows:
        longest = max([len(row.request.prompt_ids), *(len(r.request.prompt_ids) for r in chunk)])
        if chunk and (len(chunk) + 1 > max_rows or (len(chunk) + 1) * longest > max_tokens):
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


class BatchRunner:
    def __init__(self, engine: Engine, model: str, worker: str, max_rows: int, max_tokens: int):
        self.engine, self.model, self.worker = engine, model, worker
        self.max_rows, self.max_tokens = max_rows, max_tokens

    def __call__(self, items: list[WorkItem]) -> None:
        by_id = {item.job_id: item for item in items}
        rows, failed = self._prepare(items)
        if failed:
            self._store(failed, by_id)
        rows.sort(key=lambda r: len(r.request.prompt_ids))
        for chunk in chunk_by_tokens(rows, self.max_rows, self.max_tokens):
            self._store(self._generate_split_on_error(chunk), by_id)

    def _prepare(self, items: list[WorkItem]) -> tuple[list[Prepared], list[Outcome]]:
        rows: list[Prepared] = []
        failed: list[Outcome] = []
        now = time.time()
        for item in items:
            if item.deadline_at is not None and now > item.deadline_at:
                failed.append(
                    Outcome(
                        item.job_id,
                        error={
                            "code": "timeout",
                            "message": "the job passed its deadline before it ran",
                            "param": "timeout",
                            "type": "timeout",
                            "status_code": 408,
                        },
                    )
                )
                continue
            try:
                rows.append(Prepared(item, to_gen_request(self.engine, item)))
            except RequestError as exc:
                failed.append(Outcome(item.job_id, error=request_error(exc)))
            except Exception as exc:  # never let one bad body fail its batch-mates
                log.exception("preparing job %s failed", item.job_id)
                failed.append(Outcome(item.job_id, error=server_error("prepare_failed", str(exc))))
        return rows, failed

    def _generate_split_on_error(self, chunk: list[Prepared]) -> list[Outcome]:
        """Run a chunk; if the call itself fails (out of memory, a kernel error), split it in
        half and retry, down to one row, so only the row that really fails gets an error."""
        try:
            return self._generate(chunk)
        except Exception as exc:
            if len(chunk) == 1:
                log.exception("generate failed for job %s", chunk[0].item.job_id)
                return [Outcome(chunk[0].item.job_id, error=server_error("engine_error", str(exc)))]
            log.warning("generate failed on %d rows (%s); splitting", len(chunk), exc)
            mid = len(chunk) // 2
            return self._generate_split_on_error(chunk[:mid]) + self._generate_split_on_error(
                chunk[mid:]
            )

    def _generate(self, chunk: list[Prepared]) -> list[Outcome]:
        microbatch_id = new_id("mb")
        t0 = time.perf_counter()
        results = self.engine.generate([r.request for r in chunk])
        seconds = time.perf_counter() - t0
        log.info(
            "generate: %d rows, longest prompt %d tokens, %.2f s",
            len(chunk),
            max(len(r.request.prompt_ids) for r in chunk),
            seconds,
        )
        outcomes = []
        for row, res in zip(chunk, results, strict=True):
            o = Outcome(row.item.job_id, microbatch_id=microbatch_id, microbatch_size=len(chunk))
            if isinstance(res, GenResult):
                o.result = completion_body(row.item.job_id, row.item.endpoint, self.model, res)
                o.prompt_tokens, o.completion_tokens = res.prompt_tokens, res.completion_tokens
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

    def _store(self, outcomes: list[Outcome], items: dict[str, WorkItem]) -> None:
        with session_scope() as session:
            store_outcomes(session, outcomes, self.worker)
        finished = time.time()
        for o in outcomes:
            item = items.get(o.job_id)
            created, started = (item.created_at, item.started_at) if item else (None, None)
            record_outcome(self.model, o.status, created, started, finished)
