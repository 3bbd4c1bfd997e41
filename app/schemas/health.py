from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = "ok"


class SkippedCheckpoint(BaseModel):
    file: str = Field(..., description="the checkpoint file (or `workers` when the forward workers failed)")
    reason: str = Field(..., description="why it is not served")


class Readiness(BaseModel):
    status: str = Field("ready", description="ready once every model is loaded and warmed up")
    models: list[str]
    device: str
    skipped: list[SkippedCheckpoint] = Field([], description="checkpoints that failed validation or loading; "
                                                             "the others are served")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx except 422 validation errors: `detail` names the problem."""

    detail: str
