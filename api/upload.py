"""A streaming multipart/form-data receiver for file uploads.

Starlette's `request.form()` spools the whole upload to a temporary file before the route
sees it, so a size limit could only be checked afterwards. This feeds the request stream
straight into python-multipart: the `file` part goes chunk by chunk into an UploadSink (which
refuses it as soon as it passes the limit) and the small text fields are kept in memory.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from lmqueue.files import UploadSink

MAX_FIELD_BYTES = 4096


class UploadError(ValueError):
    pass


class MultipartReceiver:
    def __init__(self, content_type: str, sink: UploadSink):
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UploadError("the request must be multipart/form-data with a boundary")
        self.sink = sink
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._name = ""
        self._is_file = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._data = bytearray()
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()
        if self.filename is None:
            raise UploadError("the form has no `file` part")

    # --- python-multipart callbacks -------------------------------------------------------

    def _part_begin(self) -> None:
        self._name, self._is_file, self._disposition = "", False, b""
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._name == "file"
        if self._is_file:
            if self.filename is not None:
                raise UploadError("the form has more than one `file` part")
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.sink.write(data[start:end])
            return
        if len(self._data) + end - start > MAX_FIELD_BYTES:
            raise UploadError(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if not self._is_file and self._name:
            self.fields[self._name] = self._data.decode("utf-8", "replace")
