from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.predict import Prediction
from models.detector import DETECTION_FLOOR
from models.scene import TOP_CLASSES, FoundSign


class DetectQuery(BaseModel):
    """The query parameters of POST /v1/detect (others are ignored)."""

    classifier: str | None = Field(None, description="the classifier that names each box, a name from "
                                                       "/v1/models; default: the one the detector's "
                                                       "operating point was chosen with, else the most accurate")
    min_score: float | None = Field(None, ge=DETECTION_FLOOR, le=1, description="keep boxes whose detector "
                                    "score is at least this; default: the threshold chosen on validation frames")


class Sign(BaseModel):
    box: tuple[float, float, float, float] = Field(..., description="x1, y1, x2, y2 in the uploaded image's "
                                                                   "pixels (after EXIF orientation)")
    score: float = Field(..., ge=0, le=1, description="the detector's confidence that a sign is there")
    group: str = Field(..., description="the detector's shape/colour group: prohibitory, danger, mandatory, other")
    class_id: int = Field(..., ge=0, description="GTSRB class id named by the classifier")
    label: str = Field(..., description="English name of the sign")
    probability: float = Field(..., ge=0, le=1, description="the classifier's probability of that class")
    top: list[Prediction] = Field(..., description=f"the classifier's {TOP_CLASSES} most probable classes for "
                                                   "the box, most probable first (calibrated, as /v1/predict's)")

    @classmethod
    def of(cls, found: "FoundSign", labels: list[str]) -> "Sign":
        """A sign the scene pipeline found (models.scene), as answered: the box to 0.1 px."""
        return cls(box=tuple(round(v, 1) for v in found.box), score=found.score, group=found.group,
                   class_id=found.class_id, label=labels[found.class_id], probability=found.probability,
                   top=[Prediction(class_id=c, label=labels[c], probability=p) for c, p in found.top])


class FrameResult(BaseModel):
    filename: str = Field(..., description="the uploaded file's name, as sent")
    width: int = Field(..., description="the uploaded image's width in pixels, after EXIF orientation")
    height: int = Field(..., description="the uploaded image's height in pixels, after EXIF orientation")
    signs: list[Sign] = Field(..., description="every sign found, best detector score first; [] for none")


class DetectResponse(BaseModel):
    model: str = Field(..., description="the detector that found the boxes")
    classifier: str = Field(..., description="the classifier that named them")
    results: list[FrameResult] = Field(..., description="one per uploaded file, in upload order")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "detector", "classifier": "resnet18",
        "results": [{"filename": "street.jpg", "width": 1360, "height": 800, "signs": [
            {"box": [774.0, 411.0, 816.0, 447.0], "score": 0.81, "group": "danger", "class_id": 11,
             "label": "Right-of-way at the next intersection", "probability": 0.97, "top": [
                 {"class_id": 11, "label": "Right-of-way at the next intersection", "probability": 0.97},
                 {"class_id": 30, "label": "Beware of ice/snow", "probability": 0.02}]},
        ]}],
    }]}}
