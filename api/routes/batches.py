"""OpenAI Batch API, plus partial results and retry_failed. Thin: the work is in lmqueue.batches.

Every read advances the batch's state first (lmqueue.batches.state.advance), so a
client polling GET /v1/batches/{id} sees it progress even without a scheduler running.
Routes commit before they answer: the session dependency commits only after the response is
sent, and a client may use what it was told (an output file id) right away.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.admission import refuse
from api.deps import get_owner, get_session
from api.errors import APIError
from api.openapi import errors
from api.pagination import list_page
from api.routes.files import expired_file
from lmqueue import files as fs
from lmqueue.batches import BatchInputError
from lmqueue.batches.create import new_batch, retry_batch
from lmqueue.batches.ingest import ingest_batch
from lmqueue.batches.output import results_page
from lmqueue.batches.state import VALIDATING
from lmqueue.batches.state import cancel_batch as cancel
from lmqueue.batches.views import batch_to_dict, get_batch, view_batches
from lmqueue.batches.views import list_batches as list_page_of
from lmqueue.quotas import check_batch, check_deadline, first_model
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, FileObject

router = APIRouter(tags=["batches"], responses=errors(400, 401, 404, 409, 413, 429))


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=40)
    endpoint: str = Field(max_length=40)
    completion_window: str = Field(default="24h", max_length=16)
    metadata: dict[str, Any] | None = None
    # OpenAI's {"anchor": "created_at", "seconds": 3600..2592000}: when the output and error
    # files expire (default: LMQUEUE_RETENTION_OUTPUTS_S).
    output_expires_after: dict[str, Any] | None = None


def _api_error(exc: BatchInputError) -> APIError:
    return APIError(exc.status, exc.message, code=exc.code, param=exc.param)


def _load(session: Session, owner: str, batch_id: str) -> Batch:
    batch = get_batch(session, owner, batch_id)
    if batch is None:
        raise APIError(404, f"no batch {batch_id!r}", code="not_found", param="batch_id")
    return batch


def _output_expiry(value: dict[str, Any] | None) -> int | None:
    if value is None:
        return None
    try:
        return fs.expires_after_s(value.get("anchor"), value.get("seconds"), "output_expires_after")
    except fs.BadExpiry as exc:
        raise APIError(400, str(exc), code="invalid_value", param=exc.param) from exc


def _admit(session: Session, owner: str, f: FileObject, batch: Batch, settings: Settings) -> None:
    """429 when the key's batch quotas are reached, or when the batch clearly cannot finish in
    its completion_window given what the model already has queued."""
    refusal = check_batch(session, owner, f, settings)
    model = first_model(fs.content_path(f)) if f.storage_path and refusal is None else None
    if model is not None and batch.expires_at is not None:
        window_s = int(batch.expires_at - batch.created_at)
        refusal = check_deadline(session, model, f.line_count or 0, window_s, settings)
    if refusal is not None:
        raise refuse(refusal)


def _start(session: Session, batch: Batch, tasks: BackgroundTasks) -> dict[str, Any]:
    session.add(batch)
    session.commit()  # the row exists before the ingest task looks for it
    tasks.add_task(ingest_batch, batch.id)
    return batch_to_dict(batch)


@router.post("/v1/batches")
def create_batch(
    req: CreateBatch,
    tasks: BackgroundTasks,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    """Answers at once with status `validating`; the file is validated and its lines enqueued
    right after (a background task), then the batch is `in_progress` (or `failed`)."""
    f = fs.get_file(session, owner, req.input_file_id)
    if f is None:
        msg = f"no file {req.input_file_id!r}"
        raise APIError(404, msg, code="not_found", param="input_file_id")
    if fs.is_expired(f):
        raise expired_file(f.id, "input_file_id")
    if f.purpose != "batch":
        msg = f"file {f.id} has purpose {f.purpose!r}; a batch needs a file with purpose 'batch'"
        raise APIError(400, msg, code="invalid_value", param="input_file_id")
    settings = get_settings()
    if (f.line_count or 0) > settings.batch_max_lines:
        msg = f"file {f.id} has {f.line_count} lines; the limit is {settings.batch_max_lines}"
        raise APIError(400, msg, code="too_many_lines", param="input_file_id")
    try:
        batch = new_batch(
            owner=owner,
            input_file_id=f.id,
            endpoint=req.endpoint,
            completion_window=req.completion_window,
            metadata=req.metadata,
        )
        batch.output_expires_after_s = _output_expiry(req.output_expires_after)
    except BatchInputError as exc:
        raise _api_error(exc) from exc
    _admit(session, owner, f, batch, settings)
    return _start(session, batch, tasks)


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(
    batch_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    return view_batches(session, [_load(session, owner, batch_id)])[0]


@router.get("/v1/batches")
def list_batches(
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows, has_more = list_page_of(session, owner, after=after, limit=limit)
    return list_page(view_batches(session, rows), has_more)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    batch = _load(session, owner, batch_id)
    try:
        cancel(session, batch)
    except BatchInputError as exc:
        raise _api_error(exc) from exc
    return view_batches(session, [batch])[0]


@router.get("/v1/batches/{batch_id}/results")
def batch_results(
    batch_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    after: Annotated[str, Query(max_length=4000, description="X-Next-After of the last page")] = "",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """Finished lines (output-file shape, successes and errors together) as JSONL, as they
    finish: input order, skipping lines still running and coming back to them on a later page.
    Headers: `X-Next-After` (pass as `after` next time) and `X-Results-Complete` ("true" once
    every line of the batch has been returned). Each custom_id comes exactly once across
    pages."""
    batch = _load(session, owner, batch_id)
    page = results_page(session, batch.id, after, limit, ingested=batch.status != VALIDATING)
    headers = {
        "X-Next-After": page.cursor,
        "X-Results-Complete": "true" if page.complete else "false",
        "X-Result-Lines": str(len(page.lines)),
    }
    return Response(b"".join(page.lines), media_type="application/jsonl", headers=headers)


@router.post("/v1/batches/{batch_id}/retry_failed")
def retry_failed(
    batch_id: str,
    tasks: BackgroundTasks,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    """A child batch (`parent_batch_id`) of the failed and never-run lines of a finished one,
    from a new input file holding just those lines."""
    try:
        child = retry_batch(session, _load(session, owner, batch_id))
    except BatchInputError as exc:
        raise _api_error(exc) from exc
    return _start(session, child, tasks)
