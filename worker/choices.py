"""Requests with n > 1 choices in the slot loop: n rows under one key, one answer.

The n rows are admitted together (their common prompt is computed once, worker.prefill's
shared-prefix groups); each finished choice is held here until all n are in, then they are
gathered into one result. The first error fails the request: its other choices are dropped
from the loop and never reported.
"""

from __future__ import annotations

from typing import Any

from worker.gen_types import GenResult, RequestError
from worker.rows import Row


class Choices:
    def __init__(self) -> None:
        self._done: dict[str, list[GenResult]] = {}  # finished choices per request
        self.abandoned: set[str] = set()  # failed requests whose rows must leave

    def start(self, key: str, n: int) -> None:
        if n > 1:
            self._done[key] = []

    def forget(self, key: str) -> None:
        self._done.pop(key, None)

    def finished(self, row: Row, res: GenResult | RequestError) -> list[tuple[str, Any]]:
        """A row's outcome -> the request outcomes it completes (none while choices are
        missing, or when the request already failed)."""
        if row.req.n <= 1:
            return [(row.key, res)]
        got = self._done.get(row.key)
        if got is None:  # the request already failed
            return []
        if isinstance(res, RequestError):
            del self._done[row.key]
            self.abandoned.add(row.key)
            return [(row.key, res)]
        got.append(res)
        if len(got) < row.req.n:
            return []
        del self._done[row.key]
        return [(row.key, gather(got))]


def gather(choices: list[GenResult]) -> GenResult:
    """n choices -> one result: choice 0 carrying the others; the prompt is counted once, the
    completion tokens of every choice are summed."""
    first, *others = sorted(choices, key=lambda r: r.index)
    first.siblings = others
    first.completion_tokens = sum(r.completion_tokens for r in choices)
    first.batch_rows = max(r.batch_rows for r in choices)
    return first
