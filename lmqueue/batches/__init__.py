"""Bulk batches (OpenAI Batch API), one module per concern:

- create: parameters, a new batch, the child batch of retry_failed;
- ingest: validate the input file, insert one job per line, send them (validating -> ...);
- state: the state machine (every batch transition) and the live counts;
- output: output and error lines rendered from the job rows;
- views: reading and presenting batches (OpenAI's batch object).
"""

from __future__ import annotations


class BatchInputError(ValueError):
    """A create/cancel/retry request that cannot be honoured; maps to a 4xx."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
