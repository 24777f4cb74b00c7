"""OpenAI Files API (purpose "batch"): upload, retrieve, list, delete, content."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from python_multipart.exceptions import MultipartParseError
from sqlalchemy.orm import Session

from api.admission import refuse
from api.deps import get_owner, get_session
from api.errors import APIError
from api.openapi import errors
from api.pagination import list_page
from api.upload import MultipartReceiver, UploadError
from lmqueue import files as fs
from lmqueue.db import session_scope
from lmqueue.quotas import check_upload
from lmqueue.settings import get_settings
from lmqueue.tables import FileObject

router = APIRouter(tags=["files"], responses=errors(400, 401, 404, 413, 429))

MULTIPART_SLACK = 64 * 1024  # form fields and part headers around the file itself


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"no file {file_id!r}", code="not_found", param="file_id")


def _too_large(limit: int) -> APIError:
    msg = f"the file is larger than {limit} bytes (the limit, LMQUEUE_BATCH_MAX_FILE_BYTES)"
    return APIError(413, msg, code="file_too_large", param="file")


async def _receive(request: Request, receiver: MultipartReceiver) -> None:
    async for chunk in request.stream():
        receiver.write(chunk)
    receiver.finish()


def _check_upload(receiver: MultipartReceiver, sink: fs.UploadSink) -> str:
    settings = get_settings()
    purpose = receiver.fields.get("purpose", "")
    if purpose not in fs.UPLOAD_PURPOSES:
        raise APIError(
            400, f"purpose must be 'batch', got {purpose!r}", code="invalid_value", param="purpose"
        )
    if sink.lines > settings.batch_max_lines:
        raise APIError(
            400,
            f"the file has {sink.lines} lines; the limit is {settings.batch_max_lines} "
            "(LMQUEUE_BATCH_MAX_LINES)",
            code="too_many_lines",
            param="file",
        )
    return purpose


def _expires_after(fields: dict[str, str]) -> int | None:
    """OpenAI's multipart form fields `expires_after[anchor]` and `expires_after[seconds]`."""
    try:
        return fs.expires_after_s(
            fields.get("expires_after[anchor]"),
            fields.get("expires_after[seconds]"),
            "expires_after",
        )
    except fs.BadExpiry as exc:
        raise APIError(400, str(exc), code="invalid_value", param=exc.param) from exc


def _check_quota(owner: str, size: int) -> None:
    with session_scope() as session:
        refusal = check_upload(session, owner, size, get_settings())
    if refusal is not None:
        raise refuse(refusal)


def _store(
    sink: fs.UploadSink, owner: str, filename: str, purpose: str, expires: int | None
) -> dict[str, Any]:
    _check_quota(owner, sink.bytes)
    with session_scope() as session:
        row = fs.store_upload(
            session, sink, owner=owner, filename=filename, purpose=purpose, expires_after=expires
        )
        return fs.file_to_dict(row)


@router.post("/v1/files")
async def upload_file(request: Request, owner: Annotated[str, Depends(get_owner)]) -> Any:
    """multipart/form-data with `purpose=batch` and `file`; streamed to disk, never in memory."""
    limit = get_settings().batch_max_file_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    await run_in_threadpool(_check_quota, owner, 1)  # already full: refuse before reading
    sink = fs.UploadSink(fs.files_dir(), limit)
    try:
        receiver = MultipartReceiver(request.headers.get("content-type", ""), sink)
        await _receive(request, receiver)
        purpose = _check_upload(receiver, sink)
        expires = _expires_after(receiver.fields)
        name = receiver.filename or ""
        return await run_in_threadpool(_store, sink, owner, name, purpose, expires)
    except fs.FileTooLarge as exc:
        raise _too_large(exc.limit) from exc
    except (UploadError, MultipartParseError) as exc:
        raise APIError(400, f"bad upload: {exc}", code="invalid_upload", param="file") from exc
    finally:
        sink.discard()  # a no-op once stored (the file was moved into place)


def _load(session: Session, owner: str, file_id: str) -> FileObject:
    f = fs.get_file(session, owner, file_id)
    if f is None:
        raise _not_found(file_id)
    if fs.is_expired(f):
        raise expired_file(f.id)
    return f


def expired_file(file_id: str, param: str = "file_id") -> APIError:
    msg = f"file {file_id!r} has expired (see its expires_at); its content is deleted"
    return APIError(404, msg, code="file_expired", param=param)


@router.get("/v1/files/{file_id}")
def retrieve_file(
    file_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    f = _load(session, owner, file_id)
    fs.ensure_measured(session, f)
    return fs.file_to_dict(f)


@router.get("/v1/files")
def list_files(
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
    purpose: Annotated[str | None, Query(max_length=40)] = None,
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> dict[str, Any]:
    rows, has_more = fs.list_files(
        session, owner, purpose=purpose, after=after, limit=limit, asc=order == "asc"
    )
    for f in rows:
        fs.ensure_measured(session, f)
    data = [fs.file_to_dict(f) for f in rows]
    return list_page(data, has_more)


@router.delete("/v1/files/{file_id}")
def delete_file(
    file_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> dict[str, Any]:
    fs.delete_file(session, _load(session, owner, file_id))
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content")
def file_content(
    file_id: str,
    session: Annotated[Session, Depends(get_session, scope="function")],
    owner: Annotated[str, Depends(get_owner)],
) -> StreamingResponse:
    f = _load(session, owner, file_id)
    if f.storage_path and not fs.content_path(f).exists():
        raise APIError(404, f"the content of file {file_id!r} is gone", code="not_found")
    chunks = fs.iter_content(session, f)
    headers = {"Content-Disposition": f'attachment; filename="{f.filename}"'}
    return StreamingResponse(chunks, media_type="application/jsonl", headers=headers)
