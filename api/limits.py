"""Request hygiene and size limits, before any route runs.

- A NUL in the URL is a 400 (Postgres text cannot hold it; better refused than a failed query).
- A body whose Content-Length is over the limit is a 413 before it is read; a body without
  Content-Length (chunked) is counted as it arrives and is a 413 once it passes the limit.

Pure ASGI (not BaseHTTPMiddleware) so it can count the bytes as they are received.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmqueue.errors import error_body
from lmqueue.settings import get_settings


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI passes HTTPExceptions through, so it becomes a 413."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(413, f"{what} is larger than the limit of {limit} bytes")


def body_limit(path: str) -> tuple[int, str]:
    s = get_settings()
    if path.startswith("/v1/files"):
        # The multipart envelope (boundaries, part headers) rides on top of the file itself;
        # the upload reader enforces the file's own limit exactly.
        return s.batch_max_file_bytes + 1024 * 1024, "the upload"
    return s.max_request_bytes, "the request body"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            # Postgres text cannot hold NUL: refuse it here rather than fail in a query.
            await _send_error(send, 400, "the URL must not contain NUL (%00) characters")
            return
        limit, what = body_limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > limit:
            await _send_error(send, 413, f"{what} is {length} bytes; the limit is {limit}")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, what)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # read outside a route (another middleware): answer here
            if started:
                raise
            await _send_error(send, 413, str(exc.detail))


async def _send_error(send: Send, status: int, message: str) -> None:
    code = "request_too_large" if status == 413 else "invalid_value"
    body = json.dumps(error_body(message, "invalid_request_error", None, code))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
