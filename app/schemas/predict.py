from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from models.calibration import is_recognized

from models.classes import NUM_CLASSES
from models.ensemble import Ranked

if TYPE_CHECKING:
    from app.uploads import Upload
    from app.kinds import ServedModel


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
    recognized: bool = Field(..., description="false when the image most likely shows none of the 43 signs "
                                              "(background, a sign of another kind, a blur); the predictions "
                                              "are listed either way")
    sign_probability: float = Field(..., ge=0, le=1, description="the sign gate's score that the image shows one "
                                                                 "of the 43 signs (0.5 is its threshold)")
    predictions: list[Prediction] = Field(..., description="top_k classes, most probable first; probabilities "
                                                           "are calibrated")


class PredictResponse(BaseModel):
    model: str = Field(..., description="the model that classified the images")
    results: list[FileResult] = Field(..., description="one per uploaded file, in upload order")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "cnn",
        "results": [{"filename": "stop.jpg", "recognized": True, "sign_probability": 0.998, "predictions": [
            {"class_id": 14, "label": "Stop", "probability": 0.993},
            {"class_id": 17, "label": "No entry", "probability": 0.004},
        ]}],
    }]}}


def predict_response(served: "ServedModel", uploads: list[Upload], ranked: list[Ranked],
                     top_k: int) -> PredictResponse:
    """The answer to POST /v1/predict: per upload, whether it shows one of the signs
    (models.calibration.is_recognized under the model's rule) and its `top_k` most probable classes
    with their names. `ranked` holds, per upload, a Ranked answer (models.ensemble)."""
    labels, rule = served.class_names, served.rule
    return PredictResponse(model=served.name, results=[
        FileResult(filename=upload.filename, recognized=bool(is_recognized(probabilities[0], sign, rule)),
                   sign_probability=sign, predictions=[
            Prediction(class_id=c, label=labels[c], probability=p)
            for c, p in zip(class_ids[:top_k], probabilities[:top_k])
        ])
        for upload, (class_ids, probabilities, sign) in zip(uploads, ranked)
    ])
