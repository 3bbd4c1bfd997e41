"""Operations: liveness and readiness probes, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.dependencies import Metrics, ReadyService
from app.schemas.health import ErrorResponse, Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, summary="Every model is loaded and warmed up",
            responses={503: {"model": ErrorResponse, "description": "still loading, no model loads, or no "
                                                                 "forward worker running"}})
async def readyz(service: ReadyService) -> Readiness:
    workers = service.workers
    running, expected = (workers.answering, workers.processes) if workers else (None, None)
    if workers and workers.running == 0:
        raise HTTPException(503, "no forward worker is running; replacements are starting",
                            headers={"Retry-After": "2"})
    return Readiness(status="degraded" if workers and running < expected else "ready", models=list(service.models),
                     device=str(service.device), workers_running=running, workers_expected=expected,
                     skipped=service.skipped())


@router.get("/metrics", response_class=Response, tags=["monitoring"], summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
def prometheus_metrics(metrics: Metrics) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
