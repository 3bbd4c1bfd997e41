"""Receptive-field math: the worked example, recursion vs closed form, torch's output sizes, and the
analytic table of the real SignCNN and ResNet18 checked against back-propagated gradients."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import build_model
from models.conv_shapes import EmptyOutputError, conv_output_size
from models.receptive_field import (
    LayerDoesNotFitError,
    LayerSpec,
    closed_form_receptive_field,
    layers_of_module,
    receptive_field_table,
)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_model("resnet18")  # random init of 11 M weights: build it once per module


def test_four_5x5_layers_on_32():
    rows = receptive_field_table(32, [LayerSpec(5)] * 4)
    assert [r.receptive_field for r in rows] == [5, 9, 13, 17]
    assert [r.receptive_field_closed_form for r in rows] == [5, 9, 13, 17]
    assert [r.output_size for r in rows] == [28, 24, 20, 16]
    assert [r.jump for r in rows] == [1, 1, 1, 1]
    assert [r.start for r in rows] == [2.0, 4.0, 6.0, 8.0]
    assert [r.layer for r in rows] == [1, 2, 3, 4]


def test_dilation_enters_as_effective_kernel():
    (row,) = receptive_field_table(16, [LayerSpec(3, dilation=2)])
    assert row.receptive_field == 5 and row.output_size == 12 and row.start == 2.0


def test_stride_and_padding():
    rows = receptive_field_table(32, [LayerSpec(3, 1, 1), LayerSpec(2, 2), LayerSpec(3, 1, 1), LayerSpec(2, 2)])
    assert [r.receptive_field for r in rows] == [3, 4, 8, 10]
    assert [r.jump for r in rows] == [1, 2, 2, 4]
    assert [r.output_size for r in rows] == [32, 16, 16, 8]
    assert [r.start for r in rows] == [0.0, 0.5, 0.5, 1.5]


def test_recursion_equals_closed_form_on_random_stacks():
    rng = random.Random(0)
    for _ in range(300):
        layers = [LayerSpec(rng.randint(1, 7), rng.randint(1, 3), rng.randint(0, 3), rng.randint(1, 3))
                  for _ in range(rng.randint(1, 8))]
        try:
            rows = receptive_field_table(10_000, layers)
        except EmptyOutputError:
            continue
        for row in rows:
            assert row.receptive_field == row.receptive_field_closed_form
            assert row.receptive_field_closed_form == closed_form_receptive_field(layers[:row.layer])
            assert row.jump == math.prod(spec.stride for spec in layers[:row.layer])


def test_output_size_matches_torch():
    rng = random.Random(1)
    for _ in range(150):
        n, k, s, d = rng.randint(1, 30), rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 3)
        p = rng.randint(0, k // 2)  # max_pool2d's limit, used for both
        x = torch.zeros(1, 1, n, 1)
        expected = conv_output_size(n, k, s, p, d)
        if expected < 1:
            with pytest.raises(RuntimeError):
                F.conv2d(x, torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1))
            continue
        got = F.conv2d(x, torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1)).shape[2]
        assert got == expected
        for ceil_mode in (False, True):
            pooled = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), (d, 1), ceil_mode=ceil_mode).shape[2]
            assert pooled == conv_output_size(n, k, s, p, d, ceil_mode)


def test_empty_output_names_the_layer():
    layers = [LayerSpec(3, name="a"), LayerSpec(2, 2, name="b"), LayerSpec(5, name="c"), LayerSpec(3)]
    with pytest.raises(LayerDoesNotFitError) as info:
        receptive_field_table(8, layers)
    assert info.value.layer == 3 and info.value.input_size == 3
    assert "layer 3 (c)" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"kernel_size": 0}, {"kernel_size": 3, "stride": 0}, {"kernel_size": -1},
                                    {"kernel_size": 3, "padding": -1}, {"kernel_size": 3, "dilation": 0}])
def test_layer_spec_rejects_non_positive(kwargs):
    with pytest.raises(ValueError):
        LayerSpec(**kwargs)


def test_layers_of_sign_cnn():
    specs = layers_of_module(build_model("cnn"))
    assert [(s.name, s.kind, s.kernel_size, s.stride, s.padding) for s in specs] == [
        ("features.0", "conv", 3, 1, 1), ("features.3", "conv", 3, 1, 1), ("features.6", "maxpool", 2, 2, 0),
        ("features.7", "conv", 3, 1, 1), ("features.10", "conv", 3, 1, 1), ("features.13", "maxpool", 2, 2, 0),
        ("features.14", "conv", 3, 1, 1), ("features.17", "conv", 3, 1, 1), ("features.20", "maxpool", 2, 2, 0)]
    # The docstring's claim: after the third stage one unit sees 36 px.
    assert receptive_field_table(32, specs)[-1].receptive_field == 36


def test_layers_of_resnet18_follow_the_main_path(resnet18):
    specs = layers_of_module(resnet18)
    names = [s.name for s in specs]
    assert names[:4] == ["conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2"]
    assert len(specs) == 2 + 4 * 2 * 2 and not any("downsample" in n for n in names)
    assert {s.name for s in specs if s.stride == 2} == {"conv1", "maxpool", "layer2.0.conv1", "layer3.0.conv1",
                                                        "layer4.0.conv1"}
    rows = {r.name: r.receptive_field for r in receptive_field_table(224, specs)}
    assert [rows[f"layer{i}.1.conv2"] for i in (1, 2, 3, 4)] == [43, 99, 211, 435]


# --- empirical check -------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _linearise(model: nn.Module) -> nn.Module:
    """Same geometry, no cancellation: ReLU -> identity, max pool -> avg pool of the same window, conv
    weights 1/fan_in > 0, BatchNorm in eval mode (a positive per-channel scale). Max pooling would send
    each window's gradient to one element only, and ReLU or mixed-sign weights could zero or cancel it;
    with these swaps an input pixel has a non-zero gradient exactly when it lies in the field."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                         ceil_mode=child.ceil_mode))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0 / module.weight[0].numel())
    model.eval().requires_grad_(False)
    return model


def _check_fields(model: nn.Module, height: int, width: int, targets: dict[str, str]) -> None:
    """`targets` maps a module whose output we probe to the table row that should describe it.

    The model is square, so one layer list serves both axes; each axis gets its own table because the
    output sizes (and hence the probed units) differ when height != width.
    """
    specs = layers_of_module(model)
    tables = [{r.name: r for r in receptive_field_table(n, specs)} for n in (height, width)]
    model = _linearise(model)
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    last = list(targets)[-1]

    def keep(name):
        def hook(_module, _inputs, output):
            outputs[name] = output
            if name == last:
                raise _Stop  # the heads expect one input size; the probed layers do not
        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in targets]
    x = torch.ones(1, 3, height, width, requires_grad=True)
    with pytest.raises(_Stop):
        model(x)
    for handle in handles:
        handle.remove()

    def interval(row, unit, size):
        centre = row.start + unit * row.jump
        return (max(0, int(centre - (row.receptive_field - 1) / 2)),
                min(size - 1, int(centre + (row.receptive_field - 1) / 2)))

    for module_name, row_name in targets.items():
        row_h, row_w, out = tables[0][row_name], tables[1][row_name], outputs[module_name]
        assert tuple(out.shape[-2:]) == (row_h.output_size, row_w.output_size), module_name
        for unit_h, unit_w in ((0, 0), ((row_h.output_size - 1) // 2, (row_w.output_size - 1) // 2)):
            (grad,) = torch.autograd.grad(out[0, :, unit_h, unit_w].sum(), x, retain_graph=True)
            seen = (grad[0] != 0).any(0)
            (top, bottom), (left, right) = interval(row_h, unit_h, height), interval(row_w, unit_w, width)
            expected = torch.zeros_like(seen)
            expected[top:bottom + 1, left:right + 1] = True
            assert torch.equal(seen, expected), (f"{module_name} unit ({unit_h}, {unit_w}): expected rows "
                                                 f"[{top}, {bottom}] and columns [{left}, {right}]")


def test_sign_cnn_fields_match_gradients():
    # 48 rows so the centre unit of the last stage (field 36) is not clipped; unit 0 is, on two sides.
    probes = ("features.0", "features.3", "features.6", "features.10", "features.13", "features.17", "features.20")
    _check_fields(build_model("cnn"), 48, 40, {name: name for name in probes})


def test_resnet18_fields_match_gradients(resnet18):
    # Probing whole stages (block outputs after the residual sum) checks that the 1x1 shortcut adds
    # nothing to the main path's field. 224 rows: unit 0 of layer4 (field 435) still ends inside;
    # 64 columns keep it cheap, and there layer1's centre unit is unclipped.
    _check_fields(copy.deepcopy(resnet18), 224, 64, {"conv1": "conv1", "maxpool": "maxpool", "layer1": "layer1.1.conv2",
                                    "layer2": "layer2.1.conv2", "layer3": "layer3.1.conv2",
                                    "layer4": "layer4.1.conv2"})
