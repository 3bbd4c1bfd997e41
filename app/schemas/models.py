from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.health import SkippedCheckpoint


class BackendInfo(BaseModel):
    backend: str = Field(..., description="the forward's runtime: torch, onnxruntime or openvino")
    precision: str = Field(..., description="fp32, bf16 (CPUs with native bf16) or fp16 (CUDA)")
    reason: str = Field(..., description="why this backend: the measured speed-up, or why it fell back")
    threads: int = Field(..., description="intra-op threads per forward it was measured with")
    images_per_s: dict[str, float] = Field(..., description="bare batched forward of each candidate that "
                                                            "passed parity, measured in one run at start-up")
    parity: dict[str, dict] = Field(..., description="each candidate's outputs against torch fp32 on real "
                                                     "GTSRB test images")
    rejected: dict[str, str] = Field(..., description="candidates not served, and why")
    test_accuracy: dict[str, float] = Field(..., description="the served variant's accuracy on the GTSRB test "
                                                             "split, measured when it was chosen (compare with "
                                                             "the model's test_accuracy from training)")
    cached: bool = Field(..., description="the choice was read from the cache, made at an earlier start")


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
    backend: BackendInfo | None = Field(None, description="what runs the forward pass, and why")


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
