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
    running: list[str] = Field(..., description="what each forward worker (or this process) really runs, as "
                                                "`backend-precision`: the chosen one, or torch-fp32 where its model "
                                                "file could not be used (missing, or not the file chosen)")
    choosing: bool = Field(False, description="a runtime choice is running in the background: until it "
                                              "ends, torch serves, and the chosen runtime then takes over "
                                              "without a failed answer")
    artifact: str | None = Field(None, description="the exported model file chosen (None for torch)")
    artifact_sha256: str | None = Field(None, description="its sha256 when it passed parity: a forward loads "
                                                          "only a file with this digest")


class CalibrationInfo(BaseModel):
    temperature: float | None = Field(..., description="logits are divided by it before the softmax")
    min_confidence: float = Field(..., description="calibrated top-1 probability an answer needs to be recognised")
    test_ece_before: float | None = Field(..., description="15-bin expected calibration error on the GTSRB test "
                                                           "split with plain softmax")
    test_ece: float | None = Field(..., description="the same, calibrated")
    test_nll_before: float | None = Field(..., description="negative log-likelihood on the GTSRB test split, "
                                                           "plain softmax")
    test_nll: float | None = Field(..., description="the same, calibrated")
    test_recognized: float | None = Field(..., description="share of GTSRB test images recognised")
    test_accuracy_recognized: float | None = Field(..., description="accuracy among those")
    background_rejected: float | None = Field(..., description="share of validation background patches (GTSDB "
                                                               "frames 00500-00599) not recognised")
    validation_accuracy: float | None = Field(..., description="accuracy on the GTSDB sign crops (frames "
                                                               "00000-00599), which chooses the default model")


    @classmethod
    def from_report(cls, report: dict, rule, temperature: float | None) -> "CalibrationInfo | None":
        """From a calibration report (training.calibrate) and the recognition rule it set."""
        if not report:
            return None
        before, after = report.get("before", {}), report.get("after", {})
        test, background = after.get("test", {}), after.get("background_validation", {})
        return cls(temperature=temperature, min_confidence=rule.min_confidence,
                   test_ece_before=before.get("test", {}).get("ece"), test_ece=test.get("ece"),
                   test_nll_before=before.get("test", {}).get("nll"), test_nll=test.get("nll"),
                   test_recognized=test.get("recognized"), test_accuracy_recognized=test.get("accuracy_recognized"),
                   background_rejected=background.get("rejected"),
                   validation_accuracy=report.get("validation_accuracy"))

class ModelInfo(BaseModel):
    name: str = Field(..., description="the checkpoint's file stem; use it as ?model= and in /v1/models/{name}")
    kind: str = Field(..., description="classifier (names a cropped sign: /v1/predict), ensemble (averages "
                                       "classifiers: /v1/predict) or detector (finds signs in photos: "
                                       "/v1/detect)")
    architecture: str
    parameters: int = Field(..., description="trainable parameters")
    input_size: int = Field(..., description="classifier: side of the square input; detector: the longest "
                                             "side a photo is reduced to; in pixels")
    test_accuracy: float | None = Field(..., description="classifier: accuracy on the GTSRB test split after "
                                                         "the last epoch")
    validation: dict[str, float] | None = Field(None, description="detector: precision, recall and AP@0.5 "
                                                                  "on the validation frames after the last epoch")
    score_threshold: float | None = Field(None, description="detector: the default min_score of /v1/detect")
    min_probability: float | None = Field(None, description="detector: the classifier probability below which "
                                                            "/v1/detect drops a found box (chosen with "
                                                            "score_threshold)")
    epochs: int = Field(..., description="epochs trained")
    start_weights: str = Field(..., description="random, or imagenet for a fine-tuned torchvision model")
    checkpoint_sha256: str
    device: str = Field(..., description="where the model runs: cpu, cuda:0, ...")
    backend: BackendInfo | None = Field(None, description="what runs the forward pass, and why")
    members: list[str] | None = Field(None, description="for an ensemble: the models whose calibrated "
                                                        "probabilities it averages")
    calibration: CalibrationInfo | None = Field(None, description="absent for an uncalibrated checkpoint")


class ModelList(BaseModel):
    models: list[ModelInfo]
    default: str | None = Field(None, description="the classifier /v1/predict uses without ?model=")
    skipped: list[SkippedCheckpoint] = Field([], description="checkpoints that failed validation or loading")


class EpochMetrics(BaseModel):
    """One epoch: a classifier's train/test figures, or the detector's loss and validation figures."""

    epoch: int
    train_loss: float
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = Field(None, description="of the weights the checkpoint holds (with a weight "
                                                         "average, the average's)")
    online_test_accuracy: float | None = Field(None, description="trained with a weight average: the last "
                                                                "step's weights' test accuracy")
    val_precision: float | None = None
    val_recall: float | None = None
    val_map50: float | None = Field(None, description="AP at IoU 0.5, every sign one class")
    score_threshold: float | None = None
    seconds: float = Field(..., description="wall time of the epoch")


class TrainingMetrics(BaseModel):
    epochs: list[EpochMetrics]
