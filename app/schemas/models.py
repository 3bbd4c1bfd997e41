from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.health import SkippedCheckpoint


class ModelInfo(BaseModel):
    name: str = Field(..., description="the checkpoint's file stem; use it as ?model= and in /v1/models/{name}")
    architecture: str
    parameters: int = Field(..., description="trainable parameters")
    input_size: int = Field(..., description="side of the square input, in pixels")
    test_accuracy: float | None = Field(..., description="accuracy on the GTSRB test split after the last epoch")
    epochs: int = Field(..., description="epochs trained")
    start_weights: str = Field(..., description="random, or imagenet for a fine-tuned torchvision model")
    checkpoint_sha256: str
    device: str = Field(..., description="where the model runs: cpu, cuda:0, ...")


class ModelList(BaseModel):
    models: list[ModelInfo]
    default: str | None = Field(None, description="the model /v1/predict uses without ?model=")
    skipped: list[SkippedCheckpoint] = Field([], description="checkpoints that failed validation or loading")


class EpochMetrics(BaseModel):
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float = Field(..., description="wall time of the epoch")


class TrainingMetrics(BaseModel):
    epochs: list[EpochMetrics]
