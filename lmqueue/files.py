"""Files API storage: uploaded content on disk under `<data_dir>/files`, metadata in `files`.

Uploads are written chunk by chunk (never held in memory) and counted as they go, so a file
over the size limit is refused as soon as it passes it. A batch's output and error files are
`files` rows with `source_batch_id`: their content is rendered from the job rows on demand.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from lmqueue.batches import output as batch_output
from lmqueue.settings import Settings, get_settings
from lmqueue.tables import Batch, FileObject, new_id, now

UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
CHUNK = 1 << 16
# OpenAI's bounds for `expires_after.seconds` (files) and `output_expires_after.seconds`.
EXPIRES_MIN_S, EXPIRES_MAX_S = 3600, 30 * 86400


class BadExpiry(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def expires_after_s(anchor: Any, seconds: Any, param: str) -> int | None:
    """OpenAI's `{"anchor": "created_at", "seconds": N}` checked; None when not given."""
    if anchor in (None, "") and seconds in (None, ""):
        return None
    if anchor != "created_at":
        raise BadExpiry(f"{param}.anchor must be 'created_at', got {anchor!r}", f"{param}.anchor")
    try:
        value = int(str(seconds))
    except ValueError:
        value = -1
    if not EXPIRES_MIN_S <= value <= EXPIRES_MAX_S:
        msg = f"{param}.seconds must be an integer from {EXPIRES_MIN_S} to {EXPIRES_MAX_S}"
        raise BadExpiry(f"{msg}, got {seconds!r}", f"{param}.seconds")
    return value


def is_expired(f: FileObject, t: float | None = None) -> bool:
    """Past its expiry: answered as gone (404 file_expired) until the purge deletes it."""
    return f.expires_at is not None and f.expires_at <= (now() if t is None else t)


class FileTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than {limit} bytes (LMQUEUE_BATCH_MAX_FILE_BYTES)")
        self.limit = limit


def files_dir(settings: Settings | None = None) -> Path:
    return ((settings or get_settings()).data_dir / "files").resolve()


def content_path(f: FileObject, settings: Settings | None = None) -> Path:
    """Where an uploaded file's content is (stored relative, so the data dir can move)."""
    assert f.storage_path, f"file {f.id} has no stored content"
    return files_dir(settings) / f.storage_path


class UploadSink:
    """Receives a file chunk by chunk into a temporary file next to its final place."""

    def __init__(self, directory: Path, max_bytes: int):
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".part")
        self.path = Path(name)
        self.max_bytes = max_bytes
        self.bytes = 0
        self._newlines = 0
        self._last = b"\n"
        self._f = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise FileTooLarge(self.max_bytes)
        if data:
            self._newlines += data.count(b"\n")
            self._last = data[-1:]
            self._f.write(data)

    @property
    def lines(self) -> int:
        """Physical lines, counting a last line without a newline."""
        return self._newlines + (0 if self._last == b"\n" else 1)

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)

    def keep(self, final: Path) -> None:
        self._f.close()
        os.replace(self.path, final)


PART_GLOB = ".upload-*.part"


def sweep_stale_parts(settings: Settings | None = None, t: float | None = None) -> int:
    """Delete upload parts nobody has written to for `upload_part_stale_s`: left by a process
    killed mid-upload (a live upload touches its part with every chunk). Returns how many."""
    settings = settings or get_settings()
    directory, cutoff = files_dir(settings), (t or now()) - settings.upload_part_stale_s
    removed = 0
    for part in directory.glob(PART_GLOB) if directory.is_dir() else ():
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink()
                removed += 1
        except FileNotFoundError:  # finished or swept by another process meanwhile
            continue
    return removed


def store_upload(
    session: Session,
    sink: UploadSink,
    *,
    owner: str,
    filename: str,
    purpose: str,
    expires_after: int | None = None,
) -> FileObject:
    """Move a finished upload into place and record it. It expires `expires_after` seconds
    from now, or after the retention setting (OpenAI's batch files: 30 days)."""
    file_id = new_id("file")
    t = now()
    name = f"{file_id}.jsonl"
    sink.keep(sink.path.parent / name)
    row = FileObject(
        id=file_id,
        owner=owner,
        filename=filename[:512] or "upload.jsonl",
        purpose=purpose,
        bytes=sink.bytes,
        status="processed",
        storage_path=name,
        line_count=sink.lines,
        created_at=t,
        expires_at=t + (expires_after or get_settings().retention_files_s),
    )
    session.add(row)
    return row


def generated_file(batch: Batch, kind: str) -> FileObject:
    """A batch's output ("output") or error ("error") file: content built from its jobs. It
    expires after the batch's output_expires_after, or the retention setting."""
    t = now()
    ttl = batch.output_expires_after_s or get_settings().retention_outputs_s
    return FileObject(
        id=new_id("file"),
        owner=batch.owner,
        filename=f"{batch.id}_{kind}.jsonl",
        purpose=OUTPUT_PURPOSE,
        bytes=0,
        status="processed",
        source_batch_id=batch.id,
        line_count=None,  # measured on first read (see ensure_measured)
        created_at=t,
        expires_at=t + ttl,
    )


def get_file(session: Session, owner: str, file_id: str) -> FileObject | None:
    stmt = select(FileObject).where(
        FileObject.id == file_id, FileObject.owner == owner, FileObject.deleted_at.is_(None)
    )
    return session.scalars(stmt).first()


def list_files(
    session: Session, owner: str, *, purpose: str | None, after: str | None, limit: int, asc: bool
) -> tuple[list[FileObject], bool]:
    stmt = select(FileObject).where(
        FileObject.owner == owner,
        FileObject.deleted_at.is_(None),
        or_(FileObject.expires_at.is_(None), FileObject.expires_at > now()),
    )
    if purpose:
        stmt = stmt.where(FileObject.purpose == purpose)
    if after:
        stmt = stmt.where(FileObject.id > after if asc else FileObject.id < after)
    order = FileObject.id.asc() if asc else FileObject.id.desc()
    rows = list(session.scalars(stmt.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, f: FileObject) -> None:
    f.deleted_at = now()
    if f.storage_path:
        content_path(f).unlink(missing_ok=True)


def _kind(session: Session, f: FileObject) -> str:
    batch = session.get(Batch, f.source_batch_id)
    return "output" if batch is not None and batch.output_file_id == f.id else "error"


def ensure_measured(session: Session, f: FileObject) -> None:
    """Give a generated file its size: rendered once, then stored (its batch is terminal, so
    the content never changes)."""
    if f.source_batch_id is None or f.line_count is not None:
        return
    size = lines = 0
    for chunk in batch_output.render(f.source_batch_id, _kind(session, f)):
        size += len(chunk)
        lines += chunk.count(b"\n")
    f.bytes, f.line_count = size, lines


def iter_content(session: Session, f: FileObject) -> Iterator[bytes]:
    """The file's bytes, streamed (from disk, or rendered from the batch's jobs)."""
    if f.source_batch_id is not None:
        return batch_output.render(f.source_batch_id, _kind(session, f))
    return _read_chunks(content_path(f))


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def file_to_dict(f: FileObject) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": int(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "expires_at": int(f.expires_at) if f.expires_at else None,
        "status_details": None,
    }
