"""The decode state of one request, and how a generated token ends it.

Usage accounting (OpenAI-like): `completion_tokens` counts every token the model generated for
the request, including an EOS token that ended it and the token that completed a stop string.
`tokens` and the result's `text` never contain the EOS token; `tokens` keeps the tokens of a
stop string while `text` is cut right before it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.gen_types import GenRequest, GenResult, RequestError, TokenLogprob
from worker.structured import new_matcher

Decode = Callable[[list[int]], str]


@dataclass
class Row:
    key: str  # the caller's name for the request (a job id, or a list index)
    req: GenRequest
    limit: int  # max completion tokens for this row
    generator: torch.Generator | None = None  # None for greedy rows
    tokens: list[int] = field(default_factory=list)  # generated, EOS excluded
    completion_tokens: int = 0  # generated, EOS included
    finish_reason: str = ""
    error: RequestError | None = None
    cached_tokens: int = 0  # prompt positions reused from a shared prefix
    admitted_seq: int = 0  # admission order: the newest rows are preempted first
    admitted_step: int = 0  # the step that prefilled it
    batch_rows: int = 1  # the most rows it decoded alongside
    # Incremental detokenisation, for rows with stop strings or streaming.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_at: int = -1  # index in `text` where a stop string starts
    streamed: int = 0  # characters of `text` already handed out as TokenEvents
    last_start: int = 0  # where the latest text delta starts in `text`
    index: int = 0  # which of the request's n choices this row samples
    # Penalty state ([V] each, worker.penalties), only for rows with penalties.
    counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    matcher: Any = None  # the row's grammar matcher (worker.structured), structured output only
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token of `tokens`

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason) or self.error is not None

    def reset(self) -> None:
        """Back to the start (preempted: its KV is dropped and recomputed later)."""
        self.tokens.clear()
        self.completion_tokens = 0
        self.finish_reason, self.error = "", None
        self.text, self.prefix_offset, self.read_offset, self.stop_at = "", 0, 0, -1
        self.streamed = self.last_start = 0
        self.generator = new_generator(self.req, self.index)
        self.counts = self.seen = None
        self.matcher = new_matcher(self.req.grammar) if self.req.grammar is not None else None
        self.logprobs.clear()


def new_row(key: str, req: GenRequest, limit: int, index: int, seq: int) -> Row:
    row = Row(key, req, limit, new_generator(req, index), admitted_seq=seq, index=index)
    if req.grammar is not None:
        row.matcher = new_matcher(req.grammar)
    return row


def new_generator(req: GenRequest, index: int = 0) -> torch.Generator | None:
    """A row's own sampler state: a seeded request samples the same tokens whatever its
    batch-mates and whenever it is (re)started; choice i of a seeded request uses seed + i."""
    if req.temperature <= 0:
        return None
    generator = torch.Generator(device="cpu")
    seed = (req.seed + index) % 2**63 if req.seed is not None else secrets.randbits(63)
    generator.manual_seed(seed)
    return generator


def push(row: Row, token: int, eos_ids: set[int], decode: Decode) -> bool:
    """Append one generated token to a row; True when the row has finished."""
    row.completion_tokens += 1
    if token in eos_ids:
        row.finish_reason = "stop"
        return True
    row.tokens.append(token)
    if (row.req.stop or row.req.stream) and advance_text(row, decode) and row.req.stop:
        found = find_stop(row.text, row.req.stop, _search_from(row))
        if found >= 0:
            row.stop_at = found
            row.finish_reason = "stop"
            return True
    if row.completion_tokens >= row.limit:
        row.finish_reason = "length"
        return True
    return False


def _search_from(row: Row) -> int:
    longest = max(len(s) for s in row.req.stop)
    return max(0, row.last_start - longest + 1)


def advance_text(row: Row, decode: Decode) -> bool:
    """Incremental detokenisation (as in TGI/vLLM): decode a short window of tokens with some
    left context, so multi-byte characters and leading spaces come out right. True when text
    was added."""
    toks = row.tokens
    prefix = decode(toks[row.prefix_offset : row.read_offset])
    full = decode(toks[row.prefix_offset :])
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return False  # an incomplete UTF-8 sequence: wait for the next token
    delta = full[len(prefix) :]
    row.prefix_offset, row.read_offset = row.read_offset, len(toks)
    row.last_start = len(row.text)
    row.text += delta
    return True


def stream_delta(row: Row) -> str:
    """Text added since the last call, never past a stop string."""
    end = row.stop_at if row.stop_at >= 0 else len(row.text)
    if row.req.stop and row.stop_at < 0:
        # Hold back a tail that could still become a stop string.
        end = max(row.streamed, len(row.text) - max(len(s) for s in row.req.stop) + 1)
    delta = row.text[row.streamed : end]
    row.streamed = max(row.streamed, end)
    return delta


def result(row: Row, decode: Decode) -> GenResult | RequestError:
    if row.error is not None:
        return row.error
    text = decode(row.tokens)
    finish = row.finish_reason
    if row.req.stop:
        # Cut at the earliest stop string in the full decode (the incremental text may differ in
        # rare detokenisation corner cases; fall back to it then).
        cut = find_stop(text, row.req.stop, 0)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif row.stop_at >= 0:
            text = row.text[: row.stop_at]
    return GenResult(
        text=row.req.echo_text + text,
        token_ids=list(row.tokens),
        finish_reason=finish,
        prompt_tokens=len(row.req.prompt_ids),
        completion_tokens=row.completion_tokens,
        cached_tokens=row.cached_tokens,
        admitted_step=row.admitted_step,
        batch_rows=row.batch_rows,
        logprobs=_spelled(row.logprobs, decode) if row.req.logprobs is not None else None,
        index=row.index,
        reply=row.req.reply,
        echoed=len(row.req.echo_text),
    )


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the earliest occurrence of any stop string at or after `start`, or -1."""
    hits = [k for k in (text.find(s, start) for s in stops) if k >= 0]
    return min(hits, default=-1)


def _spelled(entries: list[TokenLogprob], decode: Decode) -> list[TokenLogprob]:
    """Logprob entries with each token's own text (a token alone may be part of a character)."""
    for e in entries:
        e.text = decode([e.token])
        e.top_text = [decode([t]) for t, _ in e.top]
    return list(entries)
