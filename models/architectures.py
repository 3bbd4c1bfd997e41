"""The two classifiers: our GTSRB CNN and torchvision's ResNet18 with a new 43-way head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.classes import NUM_CLASSES
from models.input_sizes import DEFAULT_INPUT_SIZE

ARCHITECTURES = ("cnn", "resnet18", "detector")
# what each architecture is served as (app.kinds registers a handler per kind)
KIND_OF_ARCHITECTURE = {"cnn": "classifier", "resnet18": "classifier", "detector": "detector"}
POOLINGS = 3  # SignCNN's stages, each halving the side


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had; we never fall back to random weights."""


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # bias=False: BatchNorm's shift makes a conv bias redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SignCNN(nn.Module):
    """A VGG-style CNN for small GTSRB crops, 32x32 by default (375,563 parameters, 1.5 MB in fp32).

    Why these layers:
    - three stages of two 3x3 convs (widths 32, 64, 128): two stacked 3x3s see 5x5 at the cost of
      18 weights per channel pair instead of 25, with a ReLU in between;
    - 2x2 max-pool after each stage, 32 -> 16 -> 8 -> 4: after the third stage one unit sees 36 px,
      more than the whole 32 px crop, so the last stage reasons about the complete sign;
    - BatchNorm after every conv: trains fast at high learning rates (warm-up, then cosine decay);
    - the 4x4x128 map (at 32x32; side // 8 in general) is flattened, not globally pooled, because
      where a shape sits matters ("turn left" and "turn right" differ only in layout), so the head's
      width follows from `input_size`;
    - dropout before the single linear head: the training set holds ~860 physical signs seen in
      ~30 frames each, so it is far smaller than its 25k images suggest.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128),
                 input_size: int = DEFAULT_INPUT_SIZE["cnn"]):
        super().__init__()
        side = input_size >> POOLINGS  # each 2x2 max-pool floors the side to half
        if side < 1:
            raise ValueError(f"the cnn needs an input of at least {1 << POOLINGS}x{1 << POOLINGS} pixels, "
                             f"got {input_size}x{input_size}")
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths:
            layers += _conv_bn_relu(c_in, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(c_in * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _imagenet_resnet18(weights_path: str | None) -> nn.Module:
    from torchvision.models import ResNet18_Weights, resnet18

    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"weights file not found: {path}")
        model = resnet18(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model
    try:
        return resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
    except Exception as exc:  # URLError, socket errors, hash mismatch...
        raise PretrainedWeightsUnavailable(
            "could not download torchvision's ResNet18_Weights.IMAGENET1K_V1 "
            f"({type(exc).__name__}: {exc}). On a machine with internet run "
            "`python -c \"from torchvision.models import resnet18, ResNet18_Weights; "
            "resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)\"` and copy "
            "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth here, then pass "
            "--weights PATH; or pass --start-weights random to train from scratch on purpose."
        ) from exc


def build_model(architecture: str, num_classes: int = NUM_CLASSES, start_weights: str = "random",
                weights_path: str | None = None, input_size: int | None = None) -> nn.Module:
    """Build an architecture for square inputs of `input_size` (default: DEFAULT_INPUT_SIZE; resnet18
    takes any size, its head is globally pooled). `start_weights` is "random" or "imagenet" (resnet18 only)."""
    if architecture == "cnn":
        if start_weights != "random":
            raise ValueError("the cnn has no pretrained weights; use start_weights='random'")
        return SignCNN(num_classes, input_size=input_size or DEFAULT_INPUT_SIZE["cnn"])
    if architecture == "resnet18":
        from torchvision.models import resnet18

        if start_weights == "imagenet":
            model = _imagenet_resnet18(weights_path)
        elif start_weights == "random":
            model = resnet18(weights=None)
        else:
            raise ValueError(f"unknown start_weights {start_weights!r}; expected 'random' or 'imagenet'")
        model.fc = nn.Linear(model.fc.in_features, num_classes)  # the new 43-way head
        return model
    if architecture == "detector":
        from models.detector import SignDetector

        return SignDetector(num_groups=num_classes)
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the final linear layer, [N, D]: what the sign gate of models.calibration reads.
    `classifier_head(model)(penultimate_features(model, x))` equals `model(x)` in eval mode."""
    if isinstance(model, SignCNN):
        return torch.flatten(model.features(x), 1)  # the dropout before the head is a no-op in eval
    m = model  # torchvision ResNet: its forward() up to the flattened average pool
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return torch.flatten(m.avgpool(x), 1)


def classifier_head(model: nn.Module) -> nn.Linear:
    return model.classifier[-1] if isinstance(model, SignCNN) else model.fc
