"""The API side of admission control: too many open jobs, a quota reached or a deadline that
cannot be met is a 429 with Retry-After."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.errors import APIError
from lmqueue.admission import Admission
from lmqueue.jobs import by_idempotency_key
from lmqueue.metrics import ADMISSION_REJECTIONS
from lmqueue.quotas import Refusal
from lmqueue.settings import get_settings

_admission = Admission()


def admit(
    session: Session, owner: str, model: str, n: int = 1, idempotency_key: str | None = None
) -> None:
    """Raise a 429 when `n` more jobs would pass the key's or the model's limit of open jobs.

    A retry of an already accepted request (same Idempotency-Key) is always let through: it
    creates nothing."""
    if idempotency_key and by_idempotency_key(session, owner, idempotency_key) is not None:
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


def refuse(refusal: Refusal) -> APIError:
    """A quota or deadline refusal (lmqueue.quotas) as a 429 naming it, with Retry-After."""
    ADMISSION_REJECTIONS.labels(refusal.quota).inc()
    code = "deadline_infeasible" if refusal.quota == "completion_window" else "quota_exceeded"
    return APIError(
        429,
        refusal.message,
        code=code,
        type_="rate_limit_error",
        param=refusal.param,
        headers={"Retry-After": str(refusal.retry_after_s)},
    )
