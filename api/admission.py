"""The API side of admission control: a full backlog is a 429 with Retry-After."""

from __future__ import annotations

from lmqueue.backlog import Admission
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import APIError
from lmqueue.metrics import ADMISSION_REJECTIONS
from lmqueue.settings import get_settings
from lmqueue.tables import Job

_admission = Admission()


def admit(
    session: Session, owner: str, model: str, n: int = 1, idempotency_key: str | None = None
) -> None:
    """Raise a 429 when `n` more jobs would overflow the key's or the model's backlog.

    A retry of an already accepted request (same Idempotency-Key) is always let through: it
    creates nothing."""
    if idempotency_key and session.scalar(
        select(Job.id).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
    ):
        return
    rejection = _admission.check(session, get_settings(), owner, model, n)
    if rejection is None:
        return
    ADMISSION_REJECTIONS.labels(rejection.limit).inc()
    raise APIError(
        429,
        rejection.message,
        code="rate_limit_exceeded",
        type_="rate_limit_error",
        param="model" if rejection.limit == "model" else None,
        headers={"Retry-After": str(rejection.retry_after_s)},
    )


def admitted(owner: str, model: str, n: int = 1) -> None:
    _admission.admitted(owner, model, n)
