"""Conv layer output shape, parameters and multiply-adds, checked against real nn.Conv2d layers."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from models.conv_shapes import EmptyOutputError, conv_layer, conv_output_size, effective_kernel, pair


def test_a_5x5_conv_with_10_filters_on_a_32x32_rgb_image():
    result = conv_layer(32, 32, 3, filters=10, kernel_size=5)
    assert (result.output_height, result.output_width, result.output_channels) == (28, 28, 10)
    assert result.parameters == 760  # 10 * 3 * 5 * 5 weights + 10 biases
    assert result.multiply_adds == 28 * 28 * 10 * 3 * 5 * 5


def test_no_bias():
    assert conv_layer(32, 32, 3, 10, 5, bias=False).parameters == 750


def test_pairs():
    result = conv_layer(32, 24, 3, filters=8, kernel_size=(3, 5), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
    assert (result.output_height, result.output_width) == (30, 10)
    assert result.parameters == 8 * 3 * 3 * 5 + 8


def test_helpers():
    assert pair(3) == (3, 3) and pair((3, 5)) == (3, 5) and pair([2, 4]) == (2, 4)
    assert effective_kernel(3, 2) == 5 and effective_kernel(1, 7) == 1
    assert conv_output_size(5, 7) == 0


def test_empty_output():
    with pytest.raises(EmptyOutputError, match="3x3"):
        conv_layer(2, 8, 1, 4, kernel_size=3)


def test_random_layers_match_torch():
    rng = random.Random(0)
    for _ in range(40):
        c_in, filters = rng.randint(1, 4), rng.randint(1, 5)
        h, w = rng.randint(1, 20), rng.randint(1, 20)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride, padding, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(0, 2), rng.randint(0, 2)), \
            (rng.randint(1, 2), rng.randint(1, 2))
        bias = rng.random() < 0.5
        layer = nn.Conv2d(c_in, filters, kernel, stride, padding, dilation, bias=bias)
        try:
            result = conv_layer(h, w, c_in, filters, kernel, stride, padding, dilation, bias)
        except EmptyOutputError:
            with pytest.raises(RuntimeError):
                layer(torch.zeros(1, c_in, h, w))
            continue
        out = layer(torch.zeros(1, c_in, h, w))
        assert tuple(out.shape[1:]) == (result.output_channels, result.output_height, result.output_width)
        assert result.parameters == sum(p.numel() for p in layer.parameters())
        assert result.multiply_adds == out.numel() * layer.weight[0].numel()


@pytest.mark.parametrize("kwargs", [{"kernel_size": 0}, {"kernel_size": (3, -1)}, {"stride": 0}, {"padding": -1},
                                    {"dilation": (1, 0)}, {"filters": 0}, {"input_channels": 0}])
def test_rejects_non_positive(kwargs):
    arguments = {"input_height": 8, "input_width": 8, "input_channels": 3, "filters": 4, "kernel_size": 3} | kwargs
    with pytest.raises(ValueError, match=">="):
        conv_layer(**arguments)
