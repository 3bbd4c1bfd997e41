from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str = Field("ready", description="ready once every model is loaded and warmed up")
    models: list[str]
    device: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx except 422 validation errors: `detail` names the problem."""

    detail: str
