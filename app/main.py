"""The FastAPI application: `create_app(settings)`; uvicorn serves it with `python -m app`
(or `uvicorn app.main:create_app --factory`)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.errors import Rejected
from app.http_limits import RequestLimitsMiddleware, validation_error_handler
from app.memory import keep_large_blocks_apart
from app.observability import PrometheusMiddleware, ServiceMetrics
from app.routers import calculators, detect, health, models, predict
from app.security import SecurityHeadersMiddleware, add_offline_docs
from app.service import Service
from app.settings import Settings, get_settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("signserve")


@asynccontextmanager
async def lifespan(app: FastAPI):
    service: Service = app.state.service
    keep_large_blocks_apart()  # large decodes' memory goes back to the OS when freed (app.memory)
    paths = service.check_startup()
    loading = asyncio.create_task(service.load(paths))

    def loaded(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("loading the models failed", exc_info=task.exception())

    loading.add_done_callback(loaded)
    try:
        yield
    finally:
        loading.cancel()
        await service.close()


async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug or a broken model, not the client's fault: JSON like every other answer, logged in full."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="signserve",
        summary="German traffic-sign (GTSRB, 43 classes) recognition",
        description="Upload a photo of a traffic sign, get the sign. The upload page is at [/](/).",
        version="1.0.0",
        lifespan=lifespan,
        docs_url=None,  # served from installed files by add_offline_docs, not from a CDN
        redoc_url=None,
    )
    metrics = ServiceMetrics()
    app.state.service = Service(settings=settings, metrics=metrics)
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(PrometheusMiddleware, metrics=metrics)  # outermost: counts what the limits refuse too
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Rejected, _rejected)
    app.add_exception_handler(Exception, _internal_error)

    app.include_router(predict.router)
    app.include_router(detect.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(calculators.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_offline_docs(app, STATIC_DIR)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
