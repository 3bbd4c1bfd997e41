"""Convolution as a matrix: the symbolic example, agreement with conv2d, flip, limits and bad kernels."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.conv_matrix import (
    ConvMatrixError,
    MatrixTooLargeError,
    conv_matrix,
    kernel_array,
    latex_entry,
    to_latex,
)
from models.conv_shapes import EmptyOutputError

SYMBOLIC_2X2 = [["w1", "w2"], ["w3", "w4"]]


def test_symbolic_2x2_over_3x3():
    result = conv_matrix(SYMBOLIC_2X2, [3, 3])
    assert result.shape == (4, 9) and result.symbolic
    assert result.tolist() == [
        ["w1", "w2", "0", "w3", "w4", "0", "0", "0", "0"],
        ["0", "w1", "w2", "0", "w3", "w4", "0", "0", "0"],
        ["0", "0", "0", "w1", "w2", "0", "w3", "w4", "0"],
        ["0", "0", "0", "0", "w1", "w2", "0", "w3", "w4"],
    ]
    latex = result.latex()
    assert latex.startswith("\\begin{bmatrix}") and latex.endswith("\\end{bmatrix}")
    assert "w_{1} & w_{2} & 0 & w_{3} & w_{4} & 0 & 0 & 0 & 0 \\\\" in latex


def test_padding_drops_entries():
    result = conv_matrix(SYMBOLIC_2X2, [2, 2], padding=1)
    assert result.shape == (9, 4)
    assert result.tolist()[0] == ["w4", "0", "0", "0"]  # only the bottom-right tap lands on the image
    assert result.tolist()[4] == ["w1", "w2", "w3", "w4"]


def _random_case(rng: random.Random):
    c_in, c_out = rng.randint(1, 3), rng.randint(1, 3)
    kh, kw = rng.randint(1, 4), rng.randint(1, 4)
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    h = rng.randint(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9)
    w = rng.randint(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9)
    return c_in, c_out, (kh, kw), (h, w), stride, padding, dilation


@pytest.mark.parametrize("flip", [False, True])
def test_random_numeric_cases_agree_with_conv2d(flip):
    rng, gen = random.Random(0 if not flip else 1), torch.Generator().manual_seed(0)
    for _ in range(100):
        c_in, c_out, (kh, kw), (h, w), stride, padding, dilation = _random_case(rng)
        kernel = torch.randn(c_out, c_in, kh, kw, generator=gen, dtype=torch.float64)
        x = torch.randn(1, c_in, h, w, generator=gen, dtype=torch.float64)
        # pairs, or a plain int (half of the time) where both axes agree
        s, p, d = (v if v[0] != v[1] or rng.random() < 0.5 else v[0] for v in (stride, padding, dilation))
        result = conv_matrix(kernel.tolist(), [c_in, h, w], stride=s, padding=p, dilation=d, flip=flip)
        reference = kernel.flip(-2, -1) if flip else kernel
        y = F.conv2d(x, reference, stride=stride, padding=padding, dilation=dilation)
        assert result.shape == (y.numel(), x.numel())
        assert result.output_shape == tuple(y.shape[1:])
        np.testing.assert_allclose(result.matrix @ x.flatten().numpy(), y.flatten().numpy(), rtol=1e-12, atol=1e-12)


def test_flip_is_true_convolution():
    flipped = conv_matrix(SYMBOLIC_2X2, [3, 3], flip=True).tolist()
    assert flipped[0] == ["w4", "w3", "0", "w2", "w1", "0", "0", "0", "0"]


def test_integer_kernel_stays_integer():
    result = conv_matrix([[1, 0], [0, -1]], [1, 3, 3])
    assert result.matrix.dtype == np.int64
    assert result.tolist()[0] == [1, 0, 0, 0, -1, 0, 0, 0, 0]
    assert result.latex().splitlines()[1] == "1 & 0 & 0 & 0 & -1 & 0 & 0 & 0 & 0 \\\\"


def test_multichannel_symbolic_is_channel_major():
    kernel = [[[["a"]], [["b"]]], [[["c"]], [["d"]]]]  # 2 out, 2 in, 1x1
    rows = conv_matrix(kernel, [2, 1, 2]).tolist()
    assert rows == [["a", "0", "b", "0"], ["0", "a", "0", "b"], ["c", "0", "d", "0"], ["0", "c", "0", "d"]]


def test_mixed_kernel_is_symbolic():
    result = conv_matrix([["w1", 2], [0.5, "w4"]], [2, 3])
    assert result.symbolic
    assert result.tolist()[0] == ["w1", "2", "0", "0.5", "w4", "0"]


def test_oversize_is_rejected_before_allocating(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("the matrix was allocated")

    monkeypatch.setattr(np, "zeros", no_allocation)
    monkeypatch.setattr(np, "full", no_allocation)
    with pytest.raises(MatrixTooLargeError, match="limit"):
        conv_matrix([[1]], [4096, 4096])  # 16.7 M x 16.7 M entries
    with pytest.raises(MatrixTooLargeError):
        conv_matrix(SYMBOLIC_2X2, [3, 3], max_entries=35)


def test_limit_is_inclusive():
    assert conv_matrix(SYMBOLIC_2X2, [3, 3], max_entries=36).shape == (4, 9)


@pytest.mark.parametrize("kernel, message", [
    ([[1, 2], [3]], "ragged"),
    ([1, 2, 3], "2-D"),
    ([[[1]]], "2-D"),
    ([[]], "empty"),
    ([[True, 1]], "numbers or strings"),
    ([[float("nan")]], "finite"),
    ([["w1", " "]], "empty"),
    ([[None]], "numbers or strings"),
])
def test_bad_kernels(kernel, message):
    with pytest.raises(ConvMatrixError, match=message):
        kernel_array(kernel)


def test_bad_sizes():
    with pytest.raises(ConvMatrixError, match="input channel"):
        conv_matrix([[[[1]]]], [2, 3, 3])
    with pytest.raises(ConvMatrixError, match="input_size"):
        conv_matrix([[1]], [3])
    with pytest.raises(ConvMatrixError, match=">= 1"):
        conv_matrix([[1]], [0, 3])
    with pytest.raises(ConvMatrixError, match="stride"):
        conv_matrix([[1]], [3, 3], stride=0)
    with pytest.raises(EmptyOutputError, match="empty"):
        conv_matrix([[1, 1, 1]], [3, 2])


def test_latex_entries():
    assert latex_entry("w12") == "w_{12}" and latex_entry("-w_3") == "-w_{3}"
    assert latex_entry("\\alpha") == "\\alpha" and latex_entry(0.125) == "0.125" and latex_entry(7) == "7"
    assert to_latex([[1, 2], [3, 4]]) == "\\begin{bmatrix}\n1 & 2 \\\\\n3 & 4\n\\end{bmatrix}"
