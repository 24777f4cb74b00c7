"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

import lmqueue
from api.errors import error_body, install_error_handlers
from api.routes import health, jobs, models
from api.routes import scheduler as scheduler_routes
from lmqueue.settings import get_settings


def _body_size_limit(app: FastAPI) -> None:
    @app.middleware("http")
    async def limit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        limit_bytes = get_settings().max_request_bytes
        if request.url.path.startswith("/v1/files"):
            return await call_next(request)  # uploads have their own, larger limit
        if length and length.isdigit() and int(length) > limit_bytes:
            msg = f"request body is {length} bytes; the limit is {limit_bytes}"
            return JSONResponse(error_body(msg, "invalid_request_error", None, "too_large"), 413)
        return await call_next(request)


def create_app() -> FastAPI:
    app = FastAPI(title="lmqueue", version=lmqueue.__version__)
    install_error_handlers(app)
    _body_size_limit(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(scheduler_routes.router)
    return app


app = create_app()
