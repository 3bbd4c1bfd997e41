from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = "ok"


class SkippedCheckpoint(BaseModel):
    file: str = Field(..., description="the checkpoint file (or `workers` when the forward workers failed)")
    reason: str = Field(..., description="why it is not served")


class Readiness(BaseModel):
    status: Literal["ready", "degraded"] = Field("ready", description="ready once every model is loaded and "
                                                "warmed up; degraded while a forward worker is being replaced")
    models: list[str]
    device: str
    workers_running: int | None = Field(None, description="forward worker processes answering: alive, and idle "
                                                          "or on a batch younger than a quarter of "
                                                          "SIGNSERVE_WORKER_TIMEOUT_S (null: forwards run in "
                                                          "threads of the server)")
    workers_expected: int | None = Field(None, description="forward worker processes at full capacity")
    skipped: list[SkippedCheckpoint] = Field([], description="checkpoints that failed validation or loading; "
                                                             "the others are served")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx except 422 validation errors: `detail` names the problem."""

    detail: str
