"""The calibration math, the recognition rule and their place in the checkpoint format."""

import math

import pytest
import torch

from models.architectures import build_model, classifier_head, penultimate_features
from models.calibration import (Calibration, RecognitionRule, calibrated_probabilities, expected_calibration_error,
                                fit_temperature, is_recognized, negative_log_likelihood)
from models.checkpoint import atomic_save, load_checkpoint, make_checkpoint, safe_load
from models.classes import CLASS_NAMES
from models.ensemble import EnsembleSpec, combine_ranked, ensemble_probabilities
from models.preprocessing import Preprocessing


def test_ece_of_a_hand_made_example():
    # two bins used: 0.9 (2 images, 1 right -> |0.5 - 0.9| = 0.4) and 0.6 (2 images, 2 right -> 0.4)
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_ece_is_zero_when_confidence_matches_accuracy():
    probabilities = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probabilities, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)


def test_nll_of_a_hand_made_example():
    probabilities = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert negative_log_likelihood(probabilities, torch.tensor([0, 1])) == pytest.approx(
        -(math.log(0.5) + math.log(0.75)) / 2)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 5, generator=generator)
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=generator).flatten()
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_temperature_changes_no_prediction():
    logits = torch.randn(50, 43, generator=torch.Generator().manual_seed(1))
    assert torch.equal(calibrated_probabilities(logits, 0.3).argmax(1), logits.argmax(1))


@pytest.mark.parametrize("top,sign,expected", [(0.9, 0.9, True), (0.6, 0.9, False), (0.9, 0.4, False),
                                               (0.7, 0.5, True)])
def test_is_recognized_on_floats(top, sign, expected):
    assert is_recognized(top, sign, RecognitionRule(min_confidence=0.7, min_sign_probability=0.5)) is expected


def test_is_recognized_elementwise_on_tensors():
    rule = RecognitionRule(0.7, 0.5)
    result = is_recognized(torch.tensor([0.9, 0.6, 0.9]), torch.tensor([0.9, 0.9, 0.1]), rule)
    assert result.tolist() == [True, False, False]


def test_without_a_calibration_probabilities_are_plain_softmax_and_every_image_passes_the_gate():
    c = Calibration()
    logits = torch.randn(3, 43)
    assert torch.allclose(c.probabilities(logits), logits.softmax(1))
    assert c.sign_probability(torch.randn(3, 8)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("architecture,size", [("cnn", 32), ("resnet18", 48)])
def test_head_of_the_penultimate_features_is_the_model(architecture, size):
    model = build_model(architecture).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(classifier_head(model)(penultimate_features(model, x)), model(x), atol=1e-5)


def test_calibration_travels_in_the_checkpoint_and_loads_with_weights_only(tmp_path):
    model = build_model("cnn")
    ckpt = make_checkpoint(model, architecture="cnn", class_names=list(CLASS_NAMES), preprocessing=Preprocessing(),
                           start_weights="random", metrics=[], train_args={}, data={})
    calibration = Calibration(0.5, torch.randn(2048), -1.5, RecognitionRule(0.65, 0.5), {"after": {"test": {"ece": 0.01}}})
    spec = EnsembleSpec(("cnn", "resnet18"), RecognitionRule(0.7, 0.5), {"validation_accuracy": 0.99})
    ckpt["calibration"], ckpt["ensemble"] = calibration.to_dict(), spec.to_dict()
    atomic_save(ckpt, tmp_path / "cnn.pt")
    safe_load(tmp_path / "cnn.pt")  # plain data only
    loaded = load_checkpoint(tmp_path / "cnn.pt")
    assert loaded.calibration.temperature == 0.5 and loaded.calibration.rule == RecognitionRule(0.65, 0.5)
    assert torch.equal(loaded.calibration.gate_weight, calibration.gate_weight)
    assert loaded.calibration.report == {"after": {"test": {"ece": 0.01}}}
    assert loaded.ensemble == spec


def test_a_checkpoint_without_calibration_loads_uncalibrated(tmp_path):
    ckpt = make_checkpoint(build_model("cnn"), architecture="cnn", class_names=list(CLASS_NAMES),
                           preprocessing=Preprocessing(), start_weights="random", metrics=[], train_args={}, data={})
    atomic_save(ckpt, tmp_path / "cnn.pt")
    loaded = load_checkpoint(tmp_path / "cnn.pt")
    assert loaded.calibration == Calibration() and loaded.ensemble is None


def test_combine_ranked_is_the_mean_of_the_members_probabilities():
    a = torch.tensor([0.7, 0.2, 0.1])
    b = torch.tensor([0.1, 0.5, 0.4])
    ranked = [(p.argsort(descending=True).tolist(), p.sort(descending=True).values.tolist(), s)
              for p, s in ((a, 0.9), (b, 0.3))]
    class_ids, probabilities, sign = combine_ranked(ranked)
    mean = ensemble_probabilities([a, b])
    assert class_ids == mean.argsort(descending=True).tolist() == [0, 1, 2]
    assert probabilities == pytest.approx(mean.sort(descending=True).values.tolist())
    assert sign == pytest.approx(0.6)


@pytest.mark.parametrize("key,value,message", [
    ("calibration", {"temperature": 0.0}, "calibration is malformed"),
    ("calibration", {"temperature": 0.5, "min_confidence": 1.5}, "calibration is malformed"),
    ("ensemble", {"members": ["cnn"], "min_confidence": 0.7, "min_sign_probability": 0.5}, "ensemble is malformed"),
])
def test_malformed_calibration_metadata_is_refused_at_load(tmp_path, key, value, message):
    from models.checkpoint import CheckpointError

    ckpt = make_checkpoint(build_model("cnn"), architecture="cnn", class_names=list(CLASS_NAMES),
                           preprocessing=Preprocessing(), start_weights="random", metrics=[], train_args={}, data={})
    ckpt[key] = value
    atomic_save(ckpt, tmp_path / "cnn.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "cnn.pt")


def test_a_gate_that_does_not_fit_the_features_is_refused(tmp_path):
    from models.checkpoint import CheckpointError

    ckpt = make_checkpoint(build_model("cnn"), architecture="cnn", class_names=list(CLASS_NAMES),
                           preprocessing=Preprocessing(), start_weights="random", metrics=[], train_args={}, data={})
    ckpt["calibration"] = Calibration(0.5, torch.zeros(512)).to_dict()  # a resnet18's gate
    atomic_save(ckpt, tmp_path / "cnn.pt")
    with pytest.raises(CheckpointError, match="sign gate has 512 weights"):
        load_checkpoint(tmp_path / "cnn.pt")
