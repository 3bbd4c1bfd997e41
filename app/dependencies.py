"""Shared state for route functions, as FastAPI dependencies and their `Annotated` aliases.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
pool, a thread hop per dependency per request, which costs more than the dependency itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.observability import ServiceMetrics
from app.service import ServedModel, Service


async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_metrics(service: Annotated[Service, Depends(get_service)]) -> ServiceMetrics:
    return service.metrics


def require_ready(service: Service) -> Service:
    """The service once its models are loaded and warmed up; 503 + Retry-After before that."""
    if not service.ready:
        if service.load_errors and not service.models:
            raise HTTPException(503, "no model could be loaded: " +
                                "; ".join(f"{k}: {v}" for k, v in service.load_errors.items()))
        raise HTTPException(503, "the models are still loading", headers={"Retry-After": "1"})
    return service


async def get_ready_service(service: Annotated[Service, Depends(get_service)]) -> Service:
    return require_ready(service)


ReadyService = Annotated[Service, Depends(get_ready_service)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]


def get_served_model(service: Service, name: str | None, accepts: Callable[[ServedModel], bool] = lambda m: True,
                     role: str = "model") -> ServedModel:
    """`name`, or the best model that `accepts` takes when None; 404 naming the models it would take."""
    name = name or service.best(accepts)
    if name is None:
        raise HTTPException(404, f"no {role} is served")
    served = service.models.get(name)
    if served is None or not accepts(served):
        available = [n for n, m in service.models.items() if accepts(m)]
        raise HTTPException(404, f"unknown {role} {name!r}; available: {', '.join(available) or 'none'}")
    return served


async def get_model(name: str, service: ReadyService) -> ServedModel:
    """Path parameter `name` -> the served model, or 404 naming the models that exist."""
    return get_served_model(service, name)


Model = Annotated[ServedModel, Depends(get_model)]
