"""OpenAI-shaped error responses, {"error": {...}} from lmqueue.errors, for every failure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError as StoreOperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmqueue.errors import INVALID_REQUEST, SERVER_ERROR, describe_validation, error_body


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str = INVALID_REQUEST,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type, self.headers = type_, headers


async def _api_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers
    )


async def _validation_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    message, param = describe_validation(list(exc.errors()))
    return JSONResponse(error_body(message, INVALID_REQUEST, param, "invalid_value"), 400)


async def _http_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        exc.status_code
    )
    message = str(exc.detail)
    if isinstance(exc.__cause__, RecursionError):  # FastAPI's "error parsing the body"
        message = "the JSON body is nested too deeply"
    return JSONResponse(
        error_body(message, type_, None, code),
        exc.status_code,
        headers=getattr(exc, "headers", None),
    )


STORE_RETRY_AFTER_S = 5  # a store outage (restart, failover) usually lasts seconds


def store_unavailable(exc: BaseException) -> bool:
    """Is this the store being unreachable (not a bug, not bad input)?"""
    if isinstance(exc, StoreOperationalError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


async def _store_error(_req: Request, exc: Exception) -> JSONResponse:
    """The store is unreachable: 503 with Retry-After. Nothing was created (every write commits
    before it answers), so the client may simply retry."""
    if not store_unavailable(exc):
        raise exc
    message = "the job store (database) is unreachable; nothing was created, retry later"
    return JSONResponse(
        error_body(message, SERVER_ERROR, None, "store_unavailable"),
        503,
        headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
    )


def _routes(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(prefix, route) for every route, through FastAPI's lazily included routers."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes, prefix + route.include_context.prefix)
        else:
            yield prefix, route


async def _method_not_allowed(req: Request, exc: Exception) -> JSONResponse:
    """405 whose Allow header lists every method of the path: Starlette lists only the methods
    of the first route that matched the path, when GET and POST are separate routes."""
    path, methods = req.url.path, set()
    for prefix, route in _routes(req.app.router.routes):
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex and route_methods and path.startswith(prefix) and regex.match(path[len(prefix) :]):
            methods |= set(route_methods)
    allow = ", ".join(sorted(methods))
    message = f"{req.method} is not allowed here; allowed: {allow}"
    return JSONResponse(
        error_body(message, INVALID_REQUEST, None, "method_not_allowed"),
        405,
        headers={"Allow": allow},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(405, _method_not_allowed)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _store_error)
    app.add_exception_handler(PoolTimeout, _store_error)
