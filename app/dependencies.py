"""Shared state for route functions, as FastAPI dependencies."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request

from app.registry import ModelRegistry
from models.checkpoint import LoadedModel


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_loaded_model(name: str, registry: ModelRegistry = Depends(get_registry)) -> LoadedModel:
    """Path parameter `name` -> the loaded model, or 404 naming the models that exist."""
    try:
        return registry.get(name)
    except KeyError:
        raise HTTPException(404, f"unknown model {name!r}; available: {', '.join(registry.names())}") from None
