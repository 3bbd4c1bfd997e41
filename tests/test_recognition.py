"""Calibrated probabilities and "not a sign", on real images: GTSRB test crops and background patches
cut from GTSDB frames (the validation block 00500-00599, never fitted on)."""

from __future__ import annotations

import pytest
import torch

from helpers import encode, files
from models.calibration import Calibration, expected_calibration_error
from models.checkpoint import load_checkpoint
from models.ensemble import ENSEMBLE_NAME
from training.calibration_data import VALIDATION_FRAMES, background_images, background_squares
from training.collect import logits_and_features
from models.gtsrb import default_data_root, load_split

GTSDB = f"{default_data_root()}/gtsdb"
SERVED = ("cnn", "resnet18", ENSEMBLE_NAME)
RIGHT_AMONG_RECOGNIZED = {"cnn": 0.995, ENSEMBLE_NAME: 0.995, "resnet18": 0.995}


@pytest.fixture(scope="module")
def background_pngs() -> list[tuple[str, bytes]]:
    # other squares than training.calibrate's own validation patches (another seed), same frames
    squares = background_squares(GTSDB, VALIDATION_FRAMES, per_frame=1, seed=7)[::2]
    return [(f"background-{frame:05d}-{x}-{y}-{side}.png", encode(patch, "PNG"))
            for (frame, x, y, side), patch in zip(squares, background_images(GTSDB, squares))]


@pytest.fixture(scope="module")
def sign_pngs(gtsrb_test_samples) -> list[tuple[str, bytes, int]]:
    from PIL import Image

    out = []
    for path, label in gtsrb_test_samples[::80]:  # 51 images across the split
        with Image.open(path) as image:
            out.append((path.rsplit("/", 1)[-1] + ".png", encode(image.convert("RGB"), "PNG"), label))
    return out


@pytest.mark.parametrize("model", SERVED)
def test_background_patches_are_not_recognized(client, background_pngs, model):
    results = client.post("/v1/predict", params={"model": model}, files=files(*background_pngs)).json()["results"]
    assert len(results) == len(background_pngs) == 50
    rejected = sum(not r["recognized"] for r in results)
    assert rejected >= 47, f"{model}: only {rejected} of 50 background patches rejected"
    # the top-k classes are still listed for an unrecognised image
    assert all(len(r["predictions"]) == 5 for r in results)


@pytest.mark.parametrize("model", SERVED)
def test_gtsrb_test_crops_are_recognized_and_right(client, sign_pngs, model):
    results = client.post("/v1/predict", params={"model": model},
                          files=files(*[(name, data) for name, data, _ in sign_pngs])).json()["results"]
    recognized = [(r, label) for r, (_, _, label) in zip(results, sign_pngs) if r["recognized"]]
    # ~98-99 % of the whole test split is recognised (training.calibrate measures it): 0-2 misses expected here
    assert len(recognized) >= len(sign_pngs) - 3, f"{model}: {len(recognized)} of {len(sign_pngs)} recognised"
    # >= 99.5 % of the recognised test crops are right (training.calibrate measures it on the whole split):
    # among these ~50, one miss at most
    wrong = [(r["filename"], r["predictions"][0]["class_id"], label) for r, label in recognized
             if r["predictions"][0]["class_id"] != label]
    assert len(wrong) <= 1, f"{model}: {wrong}"
    assert all(r["predictions"][0]["probability"] >= 0.5 and r["sign_probability"] >= 0.5 for r, _ in recognized)


def test_models_list_the_ensemble_with_its_accuracy_and_every_calibration(client):
    body = client.get("/v1/models").json()
    models = {m["name"]: m for m in body["models"]}
    assert set(SERVED) <= set(models)
    ensemble = models[ENSEMBLE_NAME]
    assert ensemble["members"] == ["cnn", "resnet18"] and ensemble["architecture"] == ENSEMBLE_NAME
    assert 0.99 <= ensemble["test_accuracy"] <= 1
    for name in SERVED:
        c = models[name]["calibration"]
        assert c["test_ece"] <= 0.03 and c["test_nll"] < 0.1, name
        if name != ENSEMBLE_NAME:  # the ensemble has no uncalibrated "before"
            assert c["test_ece_before"] > 0.03 and c["test_nll"] < c["test_nll_before"], name
        # the target, 99.5 % right among the recognised, holds for the models served by default (the
        # ensemble for /v1/predict, the cnn naming /v1/detect's boxes); resnet18 alone reaches 99.498 %,
        # a hair under it, as docs/calibration.md states
        assert c["test_recognized"] >= 0.98 and c["test_accuracy_recognized"] >= RIGHT_AMONG_RECOGNIZED[name], name
        assert c["background_rejected"] >= 0.95, name
    # the ensemble is the default exactly when it is at least as accurate as both members on validation data
    best_single = max(models[n]["calibration"]["validation_accuracy"] for n in ("cnn", "resnet18"))
    wins = models[ENSEMBLE_NAME]["calibration"]["validation_accuracy"] >= best_single - 1e-9
    assert (body["default"] == ENSEMBLE_NAME) == wins


@pytest.mark.parametrize("name,n", [("cnn", 4001), ("resnet18", 1000)])
def test_calibration_lowers_the_ece_on_real_test_images(name, n, checkpoint_snapshot):
    loaded = load_checkpoint(checkpoint_snapshot / f"{name}.pt")
    test = load_split(default_data_root(), "test", loaded.preprocessing).subset(n, seed=0)
    logits, _ = logits_and_features(loaded, test.images)
    before = expected_calibration_error(Calibration().probabilities(logits), test.labels)
    after = expected_calibration_error(loaded.calibration.probabilities(logits), test.labels)
    assert after < 0.03 and after < before / 3, (before, after)
    assert torch.equal(loaded.calibration.probabilities(logits).argmax(1), logits.argmax(1))


def test_the_ensemble_has_no_receptive_field_of_its_own(client):
    response = client.get(f"/v1/models/{ENSEMBLE_NAME}/receptive-field")
    assert response.status_code == 422 and "cnn and resnet18" in response.json()["detail"]
