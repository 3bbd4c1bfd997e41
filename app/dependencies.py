"""Shared state for route functions, as FastAPI dependencies.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
pool, a thread hop per dependency per request, which costs more than the dependency itself.
"""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request

from app.observability import ServiceMetrics
from app.registry import ModelRegistry
from app.service import ServedModel, Service
from app.settings import Settings
from models.checkpoint import LoadedModel


async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_settings(service: Service = Depends(get_service)) -> Settings:
    return service.settings


async def get_metrics(service: Service = Depends(get_service)) -> ServiceMetrics:
    return service.metrics


async def get_ready_service(service: Service = Depends(get_service)) -> Service:
    """The service once its models are loaded and warmed up; 503 + Retry-After before that."""
    return require_ready(service)


def require_ready(service: Service) -> Service:
    if not service.ready:
        if service.load_errors and not service.models:
            raise HTTPException(503, "no model could be loaded: " +
                                "; ".join(f"{k}: {v}" for k, v in service.load_errors.items()))
        raise HTTPException(503, "the models are still loading", headers={"Retry-After": "1"})
    return service


async def get_registry(service: Service = Depends(get_ready_service)) -> ModelRegistry:
    return service.registry


def _unknown(name: str, registry: ModelRegistry) -> HTTPException:
    return HTTPException(404, f"unknown model {name!r}; available: {', '.join(registry.names())}")


async def get_loaded_model(name: str, registry: ModelRegistry = Depends(get_registry)) -> LoadedModel:
    """Path parameter `name` -> the loaded model, or 404 naming the models that exist."""
    try:
        return registry.get(name)
    except KeyError:
        raise _unknown(name, registry) from None


def get_served_model(service: Service, name: str | None) -> ServedModel:
    """`name`, or the best model when None; 404 naming the models that exist."""
    name = name or service.registry.best()
    try:
        return service.models[name]
    except KeyError:
        raise _unknown(name, service.registry) from None
