"""A street photo in, every sign out: the one scene pipeline (find, name, filter, map back).

`name_signs` is the pipeline. It takes the two model steps as async callables, so the same code runs
the service's batchers (`/v1/detect`), in-process models (`find_signs`: `training.evaluate_detection`,
the tests) and the `signserve` batch command:

    find(frames)  uint8 frames [3, H, W]        -> per frame, (box, score, group) by falling score
    name(crops)   uint8 classifier crops [3, S, S] -> per crop, a Ranked answer (models.ensemble)

Boxes come back in the uploaded image's pixels; a box the classifier does not recognise as one of
the 43 signs (models.calibration.is_recognized) is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from models.calibration import RecognitionRule, is_recognized
from models.checkpoint import LoadedModel
from models.detector import (CLASSIFIER_MARGIN, DETECTION_FLOOR, FLIP_TEST, GROUPS, classifier_crops, detect,
                             group_of, pad_stack)
from models.ensemble import Ranked, ranked_answers
from models.preprocessing import Preprocessing, image_to_uint8, normalize, scene_size, upright_rgb

Box = tuple[float, float, float, float]  # x1, y1, x2, y2
Found = tuple[Box, float, int]  # a detection: box in the frame's pixels, score, group index
Find = Callable[[list[torch.Tensor]], Awaitable[list[list[Found]]]]
Name = Callable[[list[torch.Tensor]], Awaitable[list[Ranked]]]


@dataclass(frozen=True)
class FoundSign:
    box: Box  # in the uploaded image's pixels
    score: float  # the detector's confidence that a sign is centred there
    group: str  # the detector's shape/colour group
    class_id: int  # the classifier's top-1 of the 43 classes
    probability: float  # the classifier's probability of that class
    top: tuple[tuple[int, float], ...] = ()  # (class id, probability) of its TOP_CLASSES most probable, top-1 first
    sign_probability: float = 1.0  # the gate's probability that the box shows one of the 43 signs


@dataclass(frozen=True)
class Scene:
    """A photo ready for the pipeline: `image` RGB and upright, sized for the detector
    (models.preprocessing.scene_size); `original_size` the upload's upright (width, height), which
    the answers' boxes use."""

    image: Image.Image
    original_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): what a coordinate in `image` is multiplied by to land in the upload's pixels."""
        return self.original_size[0] / self.image.width, self.original_size[1] / self.image.height

    def to_original(self, box: Box) -> Box:
        """A box in `image` -> the upload's pixels, clipped to it."""
        (sx, sy), (width, height) = self.scale, self.original_size
        x1, y1, x2, y2 = box
        return max(0.0, x1 * sx), max(0.0, y1 * sy), min(float(width), x2 * sx), min(float(height), y2 * sy)


TOP_CLASSES = 5  # classes each found sign lists: what the page shows for a photo of one sign
DEFAULT_SCORE_THRESHOLD = 0.3  # for a detector checkpoint that stores none (training.evaluate_detection does)


def score_threshold(detector: LoadedModel) -> float:
    """The detector's default min_score: the one its evaluation chose and stored in the checkpoint."""
    return detector.inference.get("score_threshold", DEFAULT_SCORE_THRESHOLD)


def default_namer(detector: LoadedModel, accuracies: dict[str, float | None]) -> str | None:
    """The classifier that names the detector's boxes when none is asked for, among `accuracies` (name ->
    test accuracy): the one its operating point was chosen with (stored by training.evaluate_detection),
    since the probability floor is that classifier's; else the most accurate."""
    tuned = detector.inference.get("classifier")
    if tuned in accuracies:
        return tuned
    return max(accuracies, key=lambda name: accuracies[name] or 0.0, default=None)


def scene_rule(rule: RecognitionRule, detector: LoadedModel, min_probability: float | None = None) -> RecognitionRule:
    """The rule a box found in a photo is named under: the classifier's, with its top-1 probability
    at least `min_probability` (default: the one the detector's evaluation chose with its score
    threshold and stored). A box in a street photo is far less likely a sign than an image a user
    sends as one, so the classifier must be surer: lamps and tail lights otherwise pass as yellow
    "Priority road" diamonds at 0.7-0.9."""
    floor = detector.inference.get("min_probability", 0.0) if min_probability is None else min_probability
    return replace(rule, min_confidence=max(rule.min_confidence, floor))


def scene_of(image: Image.Image, max_side: int) -> Scene:
    """An opened image as a Scene (the service's decoder builds the same, reducing while it decodes)."""
    upright = upright_rgb(image)
    size = scene_size(*upright.size, max_side)
    small = upright if size == upright.size else upright.resize(size, Image.Resampling.BILINEAR)
    return Scene(small, upright.size)


def scene_frame(scene: Scene, pre: Preprocessing) -> torch.Tensor:
    """The detector's input for a scene: uint8 [3, H, W] (already at size: no resize happens)."""
    return image_to_uint8(scene.image, pre)


def whole_image_box(width: int, height: int, margin: float = CLASSIFIER_MARGIN) -> Box:
    """The box whose classifier crop (models.detector.crop_box) is the whole image: a photo framed the
    way GTSRB frames its signs, with `margin` of the sign's size on every side."""
    mx, my = width * margin / (1 + 2 * margin), height * margin / (1 + 2 * margin)
    return mx, my, width - mx, height - my


async def name_signs(scenes: Sequence[Scene], find: Find, name: Name, *, detector_pre: Preprocessing,
                     classifier_pre: Preprocessing, rule: RecognitionRule, min_score: float) -> list[list[FoundSign]]:
    """Per scene, every sign at or above `min_score` that the classifier recognises, by falling score.

    A scene in which nothing is recognised is shown whole to the classifier: a photo that is one
    sign (a close-up, a crop) is the one case a detector that looks for signs in a scene can miss
    (the sign has no surroundings), and the classifier was trained on exactly such images. When it
    recognises one, the answer is one box around the sign as GTSRB frames it (whole_image_box), its
    score the gate's probability that the image shows one of the 43 signs."""
    found = await find([scene_frame(s, detector_pre) for s in scenes])
    kept = [[f for f in frame if f[1] >= min_score] for frame in found]
    answers = await _named(scenes, kept, name, classifier_pre, rule)
    empty = [i for i, named in enumerate(answers) if not named]
    if empty:
        wholes = [[(whole_image_box(*scenes[i].image.size), 0.0, 0)] for i in empty]
        for i, named in zip(empty, await _named([scenes[i] for i in empty], wholes, name, classifier_pre, rule)):
            answers[i] = [replace(sign, group=GROUPS[group_of(sign.class_id)], score=sign.sign_probability) for sign in named]
    return answers


async def _named(scenes: Sequence[Scene], boxes: list[list[Found]], name: Name, classifier_pre: Preprocessing,
                 rule: RecognitionRule) -> list[list[FoundSign]]:
    """Per scene, the boxes the classifier recognises, named, in the upload's pixels."""
    crops = [await asyncio.to_thread(classifier_crops, scene.image, [f[0] for f in signs], classifier_pre)
             for scene, signs in zip(scenes, boxes) if signs]
    ranked = iter(await name([c for batch in crops for c in batch]) if crops else [])
    answers = []
    for scene, signs in zip(scenes, boxes):
        named = []
        for (box, score, group), (class_ids, probabilities, sign_probability) in zip(signs, ranked):
            if is_recognized(probabilities[0], sign_probability, rule):
                top = tuple(zip(class_ids[:TOP_CLASSES], probabilities[:TOP_CLASSES]))
                named.append(FoundSign(scene.to_original(box), score, GROUPS[group], class_ids[0], probabilities[0],
                                       top, sign_probability))
        answers.append(named)
    return answers


def find_signs(image: Image.Image, detector: LoadedModel, classifier: LoadedModel,
               min_score: float | None = None, flip_test: bool = FLIP_TEST,
               min_probability: float | None = None) -> list[FoundSign]:
    """`name_signs` on one photo with in-process models (min_score, min_probability: the detector's
    stored choices, scene_rule)."""
    min_score = score_threshold(detector) if min_score is None else min_score
    calibrated = classifier.calibrated()

    async def find(frames: list[torch.Tensor]) -> list[list[Found]]:
        batch = pad_stack(frames, detector.preprocessing).to(detector.device)
        found = detect(detector.model, batch, detector.preprocessing, min_score=min(min_score, DETECTION_FLOOR),
                       flip_test=flip_test)
        return [[(d.box, d.score, d.group) for d in frame] for frame in found]

    async def name(crops: list[torch.Tensor]) -> list[Ranked]:
        with torch.inference_mode():
            # NHWC input: ~1.4x faster convolutions on the CPU for the same answers
            x = normalize(torch.stack(crops).to(classifier.device), classifier.preprocessing)
            return ranked_answers(*calibrated(x.contiguous(memory_format=torch.channels_last)))

    scene = scene_of(image, detector.preprocessing.input_size)
    return asyncio.run(name_signs([scene], find, name, detector_pre=detector.preprocessing,
                                  classifier_pre=classifier.preprocessing,
                                  rule=scene_rule(classifier.calibration.rule, detector, min_probability),
                                  min_score=min_score))[0]
