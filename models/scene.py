"""A street photo in, every sign out: the detector finds boxes, a classifier names each one.

`find_signs` is the reference pipeline, run in-process by `training.evaluate_detection` and the
tests; the service runs the same steps (the same functions below) through its batchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from models.calibration import calibrated_outputs, is_recognized
from models.checkpoint import LoadedModel
from models.detector import FLIP_TEST, GROUPS, classifier_crops, detect
from models.preprocessing import image_to_uint8, normalize


@dataclass(frozen=True)
class FoundSign:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the uploaded image's pixels
    score: float  # the detector's confidence that a sign is centred there
    group: str  # the detector's shape/colour group
    class_id: int  # the classifier's top-1 of the 43 classes
    probability: float  # the classifier's probability of that class


def to_image_boxes(boxes: list[tuple[float, float, float, float]], image_size: tuple[int, int],
                   input_size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Boxes in the detector's (resized) input -> the original image's pixels, clipped to it."""
    (width, height), (w, h) = image_size, input_size
    kx, ky = width / w, height / h
    return [(max(0.0, x1 * kx), max(0.0, y1 * ky), min(float(width), x2 * kx), min(float(height), y2 * ky))
            for x1, y1, x2, y2 in boxes]


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, RGB: the image whose pixel coordinates the answers use."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")  # palette images may carry transparency; go through RGBA
    return image if image.mode == "RGB" else image.convert("RGB")


@torch.inference_mode()
def classify(classifier: LoadedModel, crops: torch.Tensor) -> tuple[list[int], list[float], list[bool]]:
    """uint8 crops [K, 3, S, S] -> top-1 class ids, their calibrated probabilities, and whether each
    crop is recognised as one of the 43 signs (models.calibration.is_recognized, as the service)."""
    if len(crops) == 0:
        return [], [], []
    # NHWC input: ~1.4x faster convolutions on the CPU for the same answers
    x = normalize(crops.to(classifier.device), classifier.preprocessing).contiguous(memory_format=torch.channels_last)
    probabilities, signs = calibrated_outputs(classifier.model, classifier.calibration, x)
    best, class_ids = probabilities.max(1)
    recognized = is_recognized(best, signs, classifier.calibration.rule)
    return class_ids.tolist(), best.tolist(), recognized.tolist()


def find_signs(image: Image.Image, detector: LoadedModel, classifier: LoadedModel,
               min_score: float | None = None, flip_test: bool = FLIP_TEST) -> list[FoundSign]:
    """Every sign in `image` by falling detector score (min_score: the checkpoint's threshold); boxes
    the classifier does not recognise as one of the 43 signs are dropped."""
    if min_score is None:
        min_score = detector.inference.get("score_threshold", 0.3)
    image = upright_rgb(image)
    frame = image_to_uint8(image, detector.preprocessing)
    (found,) = detect(detector.model, frame.unsqueeze(0).to(detector.device), detector.preprocessing,
                      min_score=min_score, flip_test=flip_test)
    boxes = to_image_boxes([d.box for d in found], image.size, (frame.shape[2], frame.shape[1]))
    class_ids, probabilities, recognized = classify(classifier, classifier_crops(image, boxes,
                                                                                 classifier.preprocessing))
    return [FoundSign(box, d.score, GROUPS[d.group], c, p)
            for box, d, c, p, r in zip(boxes, found, class_ids, probabilities, recognized) if r]
