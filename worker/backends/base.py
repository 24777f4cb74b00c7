"""The seam between the worker's loop and an inference backend.

A backend holds at most `capacity()` more requests; `admit` hands it one (already claimed in
the store), `step` advances every request it holds by one scheduling step and returns what
finished, `cancel` drops requests at the next step. The loop never looks inside.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from worker.gen_types import RequestError
from worker.slot_engine import StepOutput

__all__ = ["Backend", "StepOutput"]


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    def prepare(self, endpoint: str, body: dict[str, Any]) -> Any:
        """Parse and tokenize a request body once (in the caller's thread); raises
        RequestError for a body this backend can never run."""

    def capacity(self) -> int: ...

    @property
    def admit_batch(self) -> int:
        """While it computes, the backend takes new requests only in groups this large (or
        all that wait): the loop claims them in the same groups."""

    def admit(self, key: str, request: Any) -> RequestError | None: ...

    def step(self) -> StepOutput: ...

    def cancel(self, keys: Iterable[str]) -> None: ...

    def idle(self) -> bool: ...
