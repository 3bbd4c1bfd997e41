from __future__ import annotations

from pydantic import BaseModel, Field

from models.classes import NUM_CLASSES


class PredictQuery(BaseModel):
    """The query parameters of POST /v1/predict (others are ignored)."""

    model: str | None = Field(None, description="a name from /v1/models; default: the most accurate")
    top_k: int = Field(5, ge=1, le=NUM_CLASSES, description="classes to return per image")


class Prediction(BaseModel):
    class_id: int = Field(..., ge=0, description="GTSRB class id")
    label: str = Field(..., description="English name of the sign")
    probability: float = Field(..., ge=0, le=1)


class FileResult(BaseModel):
    filename: str = Field(..., description="the uploaded file's name, as sent")
    predictions: list[Prediction] = Field(..., description="top_k classes, most probable first")


class PredictResponse(BaseModel):
    model: str = Field(..., description="the model that classified the images")
    results: list[FileResult] = Field(..., description="one per uploaded file, in upload order")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "cnn",
        "results": [{"filename": "stop.jpg", "predictions": [
            {"class_id": 14, "label": "Stop", "probability": 0.993},
            {"class_id": 17, "label": "No entry", "probability": 0.004},
        ]}],
    }]}}
