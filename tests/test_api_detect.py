"""POST /v1/detect on the real service (conftest's `server`, the shipped detector and classifiers)
with real GTSDB validation frames: boxes found and named, mapped back through EXIF orientation and
through the reduction of a large photo, and bad input refused with 4xx."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from helpers import encode, files
from models.detector import box_iou
from models.gtsrb import default_data_root
from models.gtsdb import read_ground_truth, split_frames


@pytest.fixture(scope="module")
def val_frames():
    """The validation frames that hold signs, with their images (JPEG bytes) and true boxes."""
    root = default_data_root()
    frames = [f for f in split_frames(read_ground_truth(root), "val") if f.signs]
    folder = f"{root}/gtsdb/images"
    return [(f.name, open(f"{folder}/{f.name}", "rb").read(), f.signs) for f in frames]


def detect(client, *items: tuple[str, bytes], **params) -> dict:
    response = client.post("/v1/detect", files=files(*items), params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_street_frames_get_their_signs_boxed_and_named(client, val_frames):
    found = named = total = 0
    for name, data, signs in val_frames[:12]:
        body = detect(client, (name, data))
        # named by the classifier the detector's operating point was chosen with, not the most accurate
        assert body["model"] == "detector" and body["classifier"] == "cnn"
        [result] = body["results"]
        assert (result["filename"], result["width"], result["height"]) == (name, 1360, 800)
        scores = [s["score"] for s in result["signs"]]
        assert scores == sorted(scores, reverse=True)
        for sign in result["signs"]:
            x1, y1, x2, y2 = sign["box"]
            assert 0 <= x1 < x2 <= 1360 and 0 <= y1 < y2 <= 800
            assert sign["group"] in ("prohibitory", "danger", "mandatory", "other")
            assert 0 <= sign["probability"] <= 1 and sign["label"]
        for truth in signs:
            total += 1
            hit = next((s for s in result["signs"] if box_iou(tuple(s["box"]), truth.box) >= 0.5), None)
            found += hit is not None
            named += hit is not None and hit["class_id"] == truth.class_id
    # the shipped detector's validation recall is far above this; a broken pipeline finds ~nothing
    assert found / total >= 0.6, (found, total)
    assert named / total >= 0.5, (named, total)


def test_exif_rotated_photo_answers_in_upright_pixels(client, val_frames):
    name, data, _ = val_frames[0]
    plain = detect(client, (name, data))["results"][0]
    image = Image.open(io.BytesIO(data))
    # Stored turned 90 degrees clockwise with orientation 8, so a viewer shows the original frame:
    # the answer must be the same boxes, in the same (upright) frame of 1360x800.
    stored = image.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = detect(client, ("rotated.jpg", encode(stored, "JPEG", quality=95, exif=exif)))["results"][0]
    assert (rotated["width"], rotated["height"]) == (1360, 800)
    assert len(rotated["signs"]) >= 1
    for sign in rotated["signs"][:3]:
        assert max(box_iou(tuple(sign["box"]), tuple(s["box"])) for s in plain["signs"]) >= 0.7


def test_large_photo_is_reduced_and_its_boxes_mapped_back(client, val_frames):
    name, data, signs = val_frames[0]
    big = Image.open(io.BytesIO(data)).resize((5440, 3200), Image.Resampling.BICUBIC)  # 17.4 Mpx
    result = detect(client, ("big.jpg", encode(big, "JPEG", quality=90)))["results"][0]
    assert (result["width"], result["height"]) == (5440, 3200)
    for truth in signs:
        scaled = tuple(4 * v for v in truth.box)
        assert any(box_iou(tuple(s["box"]), scaled) >= 0.5 for s in result["signs"]), (truth, result["signs"])


def test_batch_keeps_order_and_min_score_filters(client, val_frames):
    items = [(name, data) for name, data, _ in val_frames[:3]]
    body = detect(client, *items)
    assert [r["filename"] for r in body["results"]] == [name for name, _ in items]
    strict = detect(client, *items, min_score=1.0)
    assert all(r["signs"] == [] for r in strict["results"])
    loose = detect(client, *items, min_score=0.05)
    assert sum(len(r["signs"]) for r in loose["results"]) >= sum(len(r["signs"]) for r in body["results"])


def test_classifier_choice_and_bad_requests(client, val_frames, classifier_names):
    name, data, _ = val_frames[0]
    for classifier in ("cnn", "resnet18"):
        assert detect(client, (name, data), classifier=classifier)["classifier"] == classifier
    cases = [
        *[({"classifier": c}, [(name, data)], 422, c) for c in classifier_names if c not in ("cnn", "resnet18")],
        ({"classifier": "detector"}, [(name, data)], 422, "detector"),
        ({"classifier": "vgg99"}, [(name, data)], 404, "vgg99"),
        ({"min_score": "2"}, [(name, data)], 422, "min_score"),
        ({}, [("notes.txt", b"not an image")], 422, "notes.txt"),
    ]
    for params, items, status, needle in cases:
        response = client.post("/v1/detect", files=files(*items), params=params)
        assert response.status_code == status, (params, response.text)
        assert needle in response.text
    assert client.post("/v1/predict", files=files((name, data)), params={"model": "detector"}).status_code == 422


def test_a_close_up_of_one_sign_comes_back_as_one_box_named_with_its_top_5(client):
    """The phone photo of a single sign: a GTSRB test image enlarged to 600x600 (as a user would send)."""
    from training.scale_views import close_up, gtsrb_test_crops

    right = 0
    crops = gtsrb_test_crops(default_data_root(), 6, seed=5)
    for crop in crops:
        view = close_up(crop)
        [result] = detect(client, ("close-up.jpg", encode(view.image, "JPEG")))["results"]
        assert (result["width"], result["height"]) == (600, 600)
        signs = [s for s in result["signs"] if box_iou(tuple(s["box"]), view.target.box) >= 0.5]
        right += len(signs) == 1 and signs[0]["class_id"] == crop.class_id
        for sign in result["signs"]:
            assert len(sign["top"]) == 5 and sign["top"][0]["class_id"] == sign["class_id"]
            assert [p["probability"] for p in sign["top"]] == sorted((p["probability"] for p in sign["top"]),
                                                                      reverse=True)
    assert right >= 5, right  # 0.98 of 200 close-ups in the evaluation (docs/detector.md)


def test_a_small_photo_is_enlarged_for_the_detector_and_answers_in_its_own_pixels(client, val_frames):
    name, data, signs = next(v for v in val_frames if any(s.box[2] - s.box[0] >= 30 for s in v[2]))
    with Image.open(io.BytesIO(data)) as image:
        small = encode(image.convert("RGB").resize((680, 400), Image.Resampling.BILINEAR), "JPEG")
    [result] = detect(client, ("small.jpg", small))["results"]
    assert (result["width"], result["height"]) == (680, 400)
    big = max(signs, key=lambda s: s.box[2] - s.box[0])
    truth = tuple(v / 2 for v in big.box)
    assert any(box_iou(tuple(s["box"]), truth) >= 0.5 and s["class_id"] == big.class_id for s in result["signs"])
