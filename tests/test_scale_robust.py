"""Signs at any distance: the sizes a photo is looked at (enlarged, reduced, the detector's pyramid),
how the looks' boxes merge, the whole-image answer for a photo of one sign, the zoom and close-up
views the evaluation makes from real GTSDB and GTSRB images, and hard-negative windows in training."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.calibration import RecognitionRule
from models.detector import Detection, crop_box, merge_levels, pyramid_levels
from models.gtsdb import FRAME_SIZE, Frame, Sign, read_ground_truth, split_frames
from models.gtsrb import default_data_root
from models.preprocessing import Preprocessing, scene_size
from models.scene import Scene, name_signs, whole_image_box
from training.detection_data import CropSampler
from training.scale_views import close_up, gtsrb_test_crops, zoom_view, zoom_window


@pytest.mark.parametrize("size, expected", [
    ((1360, 800), (1360, 800)),    # a dashcam frame as it is
    ((4000, 3000), (1360, 1020)),  # a phone photo reduced
    ((680, 400), (1360, 800)),     # a small photo enlarged to the frame's size
    ((600, 600), (1200, 1200)),    # at most twice
    ((30, 40), (60, 80)),
])
def test_a_photo_is_reduced_or_enlarged_toward_the_detectors_input(size, expected):
    assert scene_size(*size, 1360) == expected
    assert scene_size(*size, None) == size


def test_the_pyramid_looks_at_a_frame_three_times_and_skips_looks_too_small_to_see():
    assert pyramid_levels(800, 1360) == [(1.0, 800, 1360), (1 / 3, 267, 453), (1 / 9, 89, 151)]
    assert [f for f, _, _ in pyramid_levels(120, 120)] == [1.0, 1 / 3]  # 120/9 < 32 px
    assert [f for f, _, _ in pyramid_levels(20, 20)] == [1.0]  # the full look always runs


def test_looks_merge_into_one_box_per_sign_in_the_frames_pixels():
    whole = Detection((10.0, 10.0, 40.0, 40.0), 0.9, 0)  # found by the 1/3 look: (30, 30, 120, 120)
    same = Detection((32.0, 31.0, 118.0, 121.0), 0.6, 0)  # the full look on the same sign
    part = Detection((60.0, 60.0, 90.0, 90.0), 0.5, 2)  # the full look on the symbol inside it
    other = Detection((500.0, 300.0, 540.0, 340.0), 0.4, 1)
    merged = merge_levels([(1.0, [same, part, other]), (1 / 3, [whole])], max_detections=10)
    assert [d.score for d in merged] == [0.9, 0.4]
    assert merged[0].box == pytest.approx((30.0, 30.0, 120.0, 120.0))
    assert merged[1] == other
    assert merge_levels([(1.0, [same, part])], max_detections=1) == [same]  # one look: as decoded


def test_the_whole_image_box_crops_to_the_whole_image():
    for width, height in ((600, 600), (37, 51), (1360, 800)):
        assert crop_box(whole_image_box(width, height), width, height) == (0, 0, width, height)


def _pipeline(scene: Scene, found: list, answers: list):
    """name_signs with given steps (it takes them as callables): `found` as the detector's boxes, and
    as the classifier's answer to its k-th call (the boxes, then the whole photo) `answers[k]`."""
    calls = []

    async def find(frames):
        return [found]

    async def name(crops):
        calls.append(len(crops))
        return [answers[len(calls) - 1] for _ in crops]

    rule = RecognitionRule(min_confidence=0.5, min_sign_probability=0.5)
    result = asyncio.run(name_signs([scene], find, name, detector_pre=Preprocessing(input_size=1360, resize="fit"),
                                    classifier_pre=Preprocessing(input_size=48), rule=rule, min_score=0.3))[0]
    return result, calls


def test_a_photo_with_nothing_recognised_is_named_whole_or_answers_no_sign():
    scene = Scene(Image.new("RGB", (300, 300), (200, 30, 30)), (600, 600))
    stop = ([14, 17, 1, 2, 3, 4], [0.97, 0.01, 0.01, 0.005, 0.003, 0.002], 0.93)
    background = ([14, 17], [0.40, 0.30], 0.10)
    # the detector's box is rejected, the whole photo is a stop sign: one box, framed as GTSRB frames
    [sign], calls = _pipeline(scene, [((10.0, 10.0, 40.0, 40.0), 0.6, 0)], [background, stop])
    assert calls == [1, 1] and sign.class_id == 14 and sign.group == "other"  # GTSDB groups Stop as other
    assert sign.score == pytest.approx(0.93) and sign.top[:2] == ((14, 0.97), (17, 0.01))
    assert sign.box == pytest.approx(tuple(2 * v for v in whole_image_box(300, 300)))
    # nothing found, nothing recognised whole: no sign
    assert _pipeline(scene, [], [background]) == ([], [1])
    # a recognised box: the whole photo is not looked at
    named, calls = _pipeline(scene, [((10.0, 10.0, 40.0, 40.0), 0.6, 0)], [stop])
    assert calls == [1] and named[0].box == (20.0, 20.0, 80.0, 80.0) and named[0].score == 0.6


def test_a_zoom_window_holds_its_sign_and_a_zoom_view_enlarges_it():
    rng = random.Random(0)
    box = (1300.0, 20.0, 1350.0, 70.0)  # near a corner: the window stays inside the frame
    for zoom in (1, 2, 3, 4):
        left, top, right, bottom = zoom_window(box, zoom, rng)
        assert right - left == pytest.approx(FRAME_SIZE[0] / zoom) and bottom - top == pytest.approx(FRAME_SIZE[1] / zoom)
        assert 0 <= left and right <= FRAME_SIZE[0] + 1e-6 and 0 <= top and bottom <= FRAME_SIZE[1] + 1e-6
        assert left <= box[0] and box[2] <= right and top <= box[1] and box[3] <= bottom

    root = default_data_root()
    frame = next(f for f in split_frames(read_ground_truth(root), "val") if f.signs)
    with Image.open(Path(root) / "gtsdb" / "images" / frame.name) as image:
        view = zoom_view(image.convert("RGB"), frame, frame.signs[0], 3, random.Random(1))
    assert view.image.size == FRAME_SIZE and view.target in view.signs
    width = frame.signs[0].box[2] - frame.signs[0].box[0]
    assert view.target.box[2] - view.target.box[0] == pytest.approx(3 * width, rel=0.02)


def test_a_close_up_is_the_test_image_enlarged_with_its_sign_box():
    [crop] = gtsrb_test_crops(default_data_root(), 1, seed=2)
    view = close_up(crop)
    assert view.image.size == (600, 600) and view.signs == [view.target]
    with Image.open(crop.path) as image:
        k = 600 / image.width
        assert close_up(crop, None).image.size == image.size
    assert view.target.box[0] == pytest.approx(crop.roi[0] * k) and view.target.class_id == crop.class_id


def test_hard_negative_windows_are_centred_on_the_mined_boxes():
    frames = [Frame("a.jpg", []), Frame("b.jpg", [Sign((10.0, 10.0, 30.0, 30.0), 14)])]
    pixels = [torch.zeros(3, 400, 600, dtype=torch.uint8), torch.zeros(3, 400, 600, dtype=torch.uint8)]
    pixels[0][:, 190:210, 390:410] = 255  # the mined "blue window": the only bright pixels of frame a
    hard = [{"frame": "a.jpg", "box": [390, 190, 410, 210], "score": 0.8, "group": 2},
            {"frame": "gone.jpg", "box": [0, 0, 5, 5], "score": 0.5, "group": 0}]  # not a training frame
    sampler = CropSampler(frames, pixels, [], crop=128, scale=(1.0, 1.0), near_sign=0.0, hard_negatives=hard,
                          hard_probability=1.0, seed=3)
    assert sampler.hard == [(0, (390, 190, 410, 210))]
    for _ in range(5):
        image, targets = sampler.sample()
        assert image.float().mean() > 0  # the window holds the mined region
        assert targets["mask"].sum() == 0  # and no sign: everything there is to be left dark


def test_the_operating_point_is_the_most_recall_at_the_wanted_precision():
    from training.detection_metrics import operating_point

    grid = {(0.0, 0.25): (0.82, 0.99), (0.0, 0.35): (0.89, 0.90), (0.95, 0.25): (0.944, 0.958),
            (0.95, 0.30): (0.957, 0.930), (0.98, 0.30): (0.970, 0.901), (0.98, 0.35): (0.970, 0.901)}
    assert operating_point(grid, 0.95) == (0.95, 0.30)
    assert operating_point(grid, 0.96) == (0.98, 0.35)  # equal recall: the stricter point
    assert operating_point(grid, 0.99) == (0.95, 0.25)  # none that precise: the highest lesser figure
