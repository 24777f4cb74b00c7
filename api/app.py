"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import lmqueue
from api.errors import install_error_handlers
from api.limits import BodyLimitMiddleware
from api.openapi import install_openapi
from api.routes import (
    admin,
    batches,
    events,
    files,
    health,
    jobs,
    metrics,
    models,
    openai_sync,
    webhooks,
)
from api.routes import scheduler as scheduler_routes
from lmqueue.batches.dispatch import Pump
from lmqueue.exposure import api_problems, ensure_safe
from lmqueue.files import sweep_stale_parts
from lmqueue.settings import get_settings


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Refuse to serve other machines without keys or with placeholder secrets. The host setting
    # is the bind address: `lmqueue api` passes its --host on in LMQUEUE_API_HOST.
    settings = get_settings()
    ensure_safe(api_problems(settings), "the API")
    # Parts of uploads a killed process left (the scheduler sweeps them periodically too).
    sweep_stale_parts()
    # Batch lines are metered into Redis by a dispatcher (lmqueue.batches.dispatch); the API
    # runs one so batches move without a scheduler (a Redis lock keeps one pass at a time).
    pump = Pump(settings).start() if settings.batch_dispatch_in_api else None
    try:
        yield
    finally:
        if pump is not None:
            pump.close()


def create_app() -> FastAPI:
    app = FastAPI(title="lmqueue", version=lmqueue.__version__, lifespan=_lifespan)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware)
    metrics.install_queue_collector()
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(admin.router)
    app.include_router(files.router)  # bulk batches
    app.include_router(batches.router)  # bulk batches
    app.include_router(scheduler_routes.router)
    app.include_router(events.router)  # server-sent events of jobs and batches
    app.include_router(openai_sync.router)  # OpenAI's synchronous endpoints, through the queue
    app.include_router(webhooks.router)  # signed webhook endpoints per API key
    return app


app = create_app()
