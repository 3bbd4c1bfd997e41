import pytest
import torch

from models.architectures import PretrainedWeightsUnavailable, build_model, count_parameters
from models.classes import CLASS_NAMES, NUM_CLASSES


def test_class_names_are_the_43_gtsrb_signs():
    assert NUM_CLASSES == 43
    assert CLASS_NAMES[0] == "Speed limit (20km/h)"
    assert CLASS_NAMES[14] == "Stop"
    assert CLASS_NAMES[42] == "End of no passing by vehicles over 3.5 metric tons"


@pytest.mark.parametrize("arch,size", [("cnn", 32), ("resnet18", 48), ("resnet18", 32)])
def test_output_shape_is_batch_by_43(arch, size):
    model = build_model(arch).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, 43)


@pytest.mark.parametrize("size", [32, 36, 48, 64])
def test_cnn_head_follows_the_input_size(size):
    model = build_model("cnn", input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 43)
    assert model.classifier[-1].in_features == 128 * (size // 8) ** 2


def test_cnn_refuses_an_input_too_small_for_its_three_poolings():
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("cnn", input_size=7)


def test_cnn_checkpoint_at_another_size_loads_and_runs(tmp_path):
    from models.checkpoint import atomic_save, load_checkpoint, make_checkpoint
    from models.preprocessing import Preprocessing

    checkpoint = make_checkpoint(build_model("cnn", input_size=48), architecture="cnn", class_names=list(CLASS_NAMES),
                                 preprocessing=Preprocessing(input_size=48), start_weights="random", metrics=[],
                                 train_args={}, data={})
    atomic_save(checkpoint, tmp_path / "cnn48.pt")
    loaded = load_checkpoint(tmp_path / "cnn48.pt")
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 48, 48)).shape == (1, 43)


def test_cnn_is_small():
    n = count_parameters(build_model("cnn"))
    assert 100_000 < n < 1_000_000  # the docs state 375,563
    assert n == 375_563


def test_resnet18_has_a_new_43_way_head():
    model = build_model("resnet18")
    assert model.fc.out_features == 43 and model.fc.in_features == 512


def test_imagenet_weights_offline_fail_loudly(monkeypatch, tmp_path):
    # No internet here and an empty hub cache: asking for ImageNet weights must stop, not train from scratch.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # offline on any runner
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    for bypass in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(bypass, raising=False)
    with pytest.raises(PretrainedWeightsUnavailable, match="--weights PATH"):
        build_model("resnet18", start_weights="imagenet")


def test_missing_local_weights_file_fails_loudly(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="not found"):
        build_model("resnet18", start_weights="imagenet", weights_path=str(tmp_path / "nope.pth"))


def test_local_imagenet_weights_file_is_used(tmp_path):
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", start_weights="imagenet", weights_path=str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.fc.out_features == 43


def test_cnn_has_no_pretrained_start():
    with pytest.raises(ValueError):
        build_model("cnn", start_weights="imagenet")
