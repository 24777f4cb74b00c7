"""Liveness (/healthz: the process answers) and readiness (/readyz: it can serve)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from lmqueue.db import get_engine
from lmqueue.readiness import readiness
from lmqueue.settings import get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready; `reasons` says why"}})
def readyz() -> JSONResponse:
    checks = readiness(get_engine(), get_settings().redis_url)
    reasons = [f"{name}: {problem}" for name, problem in checks.items() if problem]
    body = {
        "status": "not_ready" if reasons else "ready",
        "checks": {name: problem or "ok" for name, problem in checks.items()},
        "reasons": reasons,
    }
    return JSONResponse(body, status_code=503 if reasons else 200)
