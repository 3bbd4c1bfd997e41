import os
import pickle
from pathlib import Path

import pytest
import torch

from models.architectures import build_model
from models.checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint, metrics_csv
from models.classes import CLASS_NAMES
from models.preprocessing import Preprocessing

METRICS = [{"epoch": 1, "train_loss": 1.5, "train_accuracy": 0.6, "test_loss": 1.7, "test_accuracy": 0.55, "seconds": 3.0}]


def _checkpoint(arch="cnn", half=False, size=32):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    ckpt = make_checkpoint(model, architecture=arch, class_names=list(CLASS_NAMES), preprocessing=Preprocessing(size),
                           start_weights="random", metrics=METRICS, train_args={"lr": 0.05, "model": arch},
                           data={"root": "x", "train_samples": 10, "test_samples": 5}, half=half)
    return model, ckpt


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    model, ckpt = _checkpoint()
    atomic_save(ckpt, tmp_path / "cnn.pt")
    loaded = load_checkpoint(tmp_path / "cnn.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-6)
    assert loaded.architecture == "cnn" and loaded.class_names == list(CLASS_NAMES)
    assert loaded.preprocessing == Preprocessing(32)
    assert loaded.metrics == METRICS and loaded.test_accuracy == 0.55
    assert loaded.train_args["lr"] == 0.05 and loaded.start_weights == "random"
    assert len(loaded.sha256) == 64 and not loaded.model.training


def test_half_precision_storage_halves_the_file_and_keeps_predictions(tmp_path):
    model, full = _checkpoint("resnet18", size=48)
    _, half = _checkpoint("resnet18", half=True, size=48)
    atomic_save(full, tmp_path / "full.pt")
    atomic_save(half, tmp_path / "half.pt")
    assert os.path.getsize(tmp_path / "half.pt") < 0.55 * os.path.getsize(tmp_path / "full.pt")
    loaded = load_checkpoint(tmp_path / "half.pt")
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), loaded.model(x).argmax(1))


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    _, ckpt = _checkpoint()
    ckpt["payload"] = _Exploit(marker)
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a safe checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # the same payload as a bare pickle, too
    (tmp_path / "evil2.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a signserve checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    _, ckpt = _checkpoint()
    atomic_save(ckpt, tmp_path / "cnn.pt")
    data = (tmp_path / "cnn.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pt")


def test_atomic_save_leaves_old_file_intact_when_writing_fails(tmp_path):
    path = tmp_path / "cnn.pt"
    _, ckpt = _checkpoint()
    atomic_save(ckpt, path)
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unsaveable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.pt"]  # no temp file left behind


def test_metrics_csv_has_the_six_columns():
    text = metrics_csv(METRICS)
    assert text.splitlines()[0] == "epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds"
    assert text.splitlines()[1].startswith("1,1.500000,0.600000,1.700000,0.550000,")


def test_metrics_csv_adds_the_last_steps_accuracy_of_a_weight_averaged_run():
    from app.plots import curves

    averaged = [{**METRICS[0], "online_test_accuracy": 0.5}]
    lines = metrics_csv(averaged).splitlines()
    assert lines[0] == "epoch,train_loss,train_accuracy,test_loss,test_accuracy,online_test_accuracy,seconds"
    assert lines[1].startswith("1,1.500000,0.600000,1.700000,0.550000,0.500000,")
    _, _, scores = curves(averaged)
    assert dict(scores)["test accuracy, last step"] == (0.5,) and dict(scores)["test accuracy"] == (0.55,)


def test_saved_files_are_world_readable_like_a_plain_open(tmp_path):
    # mkstemp would leave 0600: a container's non-root user could not read a mounted checkpoint.
    _, ckpt = _checkpoint()
    old = os.umask(0o022)
    try:
        atomic_save(ckpt, tmp_path / "cnn.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "cnn.pt").stat().st_mode & 0o777 == 0o644
