"""A checkpoint that fails validation, for any reason, is skipped and named with its reason in /readyz
and /v1/models; the good checkpoints beside it are served."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import app_client
from helpers import files
from models.checkpoint import CheckpointError, atomic_save, load_checkpoint


def _variant(source: Path, target: Path, **changes) -> None:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint.update(changes)
    atomic_save(checkpoint, target)


@pytest.fixture(scope="module")
def mixed_dir(checkpoint_snapshot: Path, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mixed")
    shutil.copy2(checkpoint_snapshot / "cnn.pt", directory / "cnn.pt")
    _variant(checkpoint_snapshot / "cnn.pt", directory / "a_metrics.pt", metrics=[{"epoch": 1}])
    _variant(checkpoint_snapshot / "cnn.pt", directory / "b_preprocessing.pt", preprocessing={"input_size": "x"})
    _variant(checkpoint_snapshot / "cnn.pt", directory / "c_classes.pt", class_names="not a list")
    _variant(checkpoint_snapshot / "cnn.pt", directory / "d_architecture.pt", architecture="vgg")
    (directory / "e_garbage.pt").write_bytes(b"not a checkpoint at all")
    return directory


REASONS = {"a_metrics.pt": "metrics[0] lacks train_loss", "b_preprocessing.pt": "preprocessing is malformed",
           "c_classes.pt": "class_names", "d_architecture.pt": "unknown architecture 'vgg'",
           "e_garbage.pt": "not a safe checkpoint"}


def test_malformed_checkpoints_are_skipped_and_the_good_one_served(mixed_dir, sign_png):
    with app_client(mixed_dir) as client:
        ready = client.get("/readyz").json()
        assert ready["models"] == ["cnn"]
        skipped = {item["file"]: item["reason"] for item in ready["skipped"]}
        assert set(skipped) == set(REASONS)
        for file, words in REASONS.items():
            assert words in skipped[file], (file, skipped[file])
        listing = client.get("/v1/models").json()
        assert [m["name"] for m in listing["models"]] == ["cnn"] and listing["default"] == "cnn"
        assert {item["file"] for item in listing["skipped"]} == set(REASONS)
        response = client.post("/v1/predict", files=files(("sign.png", sign_png)))
        assert response.status_code == 200 and response.json()["model"] == "cnn"


@pytest.mark.parametrize("file", ["a_metrics.pt", "b_preprocessing.pt", "c_classes.pt"])
def test_load_checkpoint_refuses_malformed_metadata(mixed_dir, file):
    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(mixed_dir / file)


def test_when_nothing_loads_readyz_says_why(tmp_path, checkpoint_snapshot):
    _variant(checkpoint_snapshot / "cnn.pt", tmp_path / "only.pt", metrics=[{"epoch": 1}])
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(checkpoint_dir=tmp_path, worker_processes=False, warmup=False)
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            response = client.get("/readyz")
            if "no model could be loaded" in response.text:
                break
            time.sleep(0.05)
        assert response.status_code == 503
        assert "only.pt" in response.json()["detail"] and "metrics[0]" in response.json()["detail"]
