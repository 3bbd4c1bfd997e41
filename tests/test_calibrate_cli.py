"""`python -m training.calibrate` recalibrates a trained checkpoint in place, without retraining."""

import subprocess
import sys

import torch

from models.paths import PROJECT_ROOT as ROOT
from models.architectures import classifier_head
from models.checkpoint import atomic_save, load_checkpoint, safe_load
from models.gtsrb import default_data_root


def test_calibrate_writes_the_calibration_into_an_uncalibrated_checkpoint(tmp_path, checkpoint_snapshot):
    ckpt = safe_load(checkpoint_snapshot / "cnn.pt")
    ckpt.pop("calibration", None)
    ckpt.pop("ensemble", None)
    path = tmp_path / "cnn.pt"
    atomic_save(ckpt, path)
    assert load_checkpoint(path).calibration.report == {}

    result = subprocess.run([sys.executable, "-m", "training.calibrate", "--checkpoint", str(path),
                             "--data-root", default_data_root()], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr
    assert "ECE" in result.stdout and f"wrote the calibration into {path}" in result.stdout

    loaded = load_checkpoint(path)
    c = loaded.calibration
    assert 0 < c.temperature < 1  # label smoothing left the cnn under-confident
    features = classifier_head(loaded.model).in_features  # the gate reads the penultimate features
    assert c.gate_weight is not None and c.gate_weight.shape == (features,)
    after, before = c.report["after"], c.report["before"]
    assert after["test"]["ece"] < before["test"]["ece"] and after["test"]["nll"] < before["test"]["nll"]
    assert after["background_validation"]["rejected"] >= 0.95
    assert loaded.ensemble is None  # alone, it describes no ensemble
    # the weights are untouched
    for name, tensor in safe_load(path)["state_dict"].items():
        assert torch.equal(tensor, ckpt["state_dict"][name]), name


def test_calibrate_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training.calibrate", "--checkpoint", str(tmp_path / "nope.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no checkpoint at" in result.stderr
