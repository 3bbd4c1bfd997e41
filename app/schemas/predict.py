from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from models.classes import NUM_CLASSES

if TYPE_CHECKING:
    from app.uploads import Upload
    from models.checkpoint import LoadedModel


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


def predict_response(model: LoadedModel, uploads: list[Upload], ranked: list[tuple[list[int], list[float]]],
                     top_k: int) -> PredictResponse:
    """The answer to POST /v1/predict: per upload, its `top_k` most probable classes with their names.
    `ranked` holds, per upload, every class id by falling probability and the probabilities."""
    labels = model.class_names
    return PredictResponse(model=model.name, results=[
        FileResult(filename=upload.filename, predictions=[
            Prediction(class_id=c, label=labels[c], probability=p)
            for c, p in zip(class_ids[:top_k], probabilities[:top_k])
        ])
        for upload, (class_ids, probabilities) in zip(uploads, ranked)
    ])
