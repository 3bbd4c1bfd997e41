"""A 2-D convolution written out as the matrix it is.

`torch.nn.functional.conv2d(x, w, stride=s, padding=p, dilation=d)` is linear in x, so for a fixed
kernel it is a matrix M with

    conv2d(x, w).flatten() == M @ x.flatten()

Row r = (o, i, j) is output channel o at output position (i, j), column c = (q, y, x) is input channel
q at pixel (y, x), both flattened channel-major then row-major, as `Tensor.flatten` does, and

    M[(o, i, j), (q, y, x)] = w[o, q, a, b]   where y = i s_h - p_h + a d_h  and  x = j s_w - p_w + b d_w,

and 0 where no kernel tap (a, b) lands on (y, x). Columns index the unpadded input: a tap that lands on
padding multiplies a zero, so it simply has no entry. This is cross-correlation, what conv2d computes;
`flip=True` flips the kernel in both spatial axes first, which gives true convolution.

Kernels hold numbers, or strings for a symbolic matrix (zeros are then the string "0").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from models.conv_shapes import EmptyOutputError, conv_output_size, effective_kernel, pair

MAX_ENTRIES = 4_000_000
# A LaTeX matrix this big cannot be typeset in any useful way; above it `latex` is None.
LATEX_MAX_ENTRIES = 250_000

Entry = int | float | str


class ConvMatrixError(ValueError):
    """The kernel or input size cannot describe a convolution."""


class MatrixTooLargeError(ConvMatrixError):
    """The matrix would have more than the allowed number of entries."""


@dataclass(frozen=True)
class ConvMatrix:
    matrix: np.ndarray  # int64, float64, or object (str) for symbolic kernels
    input_shape: tuple[int, int, int]  # C_in, H, W
    output_shape: tuple[int, int, int]  # C_out, H_out, W_out

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def symbolic(self) -> bool:
        return self.matrix.dtype == object

    def tolist(self) -> list[list[Entry]]:
        return self.matrix.tolist()

    def latex(self) -> str:
        return to_latex(self.matrix)


def _nested_shape(value: Any, path: str = "kernel") -> tuple[int, ...]:
    """The shape of a rectangular nested list; ConvMatrixError for ragged or empty ones."""
    if not isinstance(value, (list, tuple)):
        return ()
    if len(value) == 0:
        raise ConvMatrixError(f"{path} is empty")
    shapes = {_nested_shape(item, f"{path}[{i}]") for i, item in enumerate(value)}
    if len(shapes) != 1:
        raise ConvMatrixError(f"{path} is ragged: its items have shapes {sorted(shapes)}")
    return (len(value), *shapes.pop())


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def kernel_array(kernel: Sequence) -> np.ndarray:
    """A 2-D [kh][kw] or 4-D [out][in][kh][kw] nested list -> 4-D array.

    All ints give int64, numbers give float64, and any string makes the kernel symbolic: an object
    array of strings, numbers written as str(number).
    """
    shape = _nested_shape(kernel)
    if len(shape) not in (2, 4):
        raise ConvMatrixError(f"kernel must be a 2-D [kh][kw] or 4-D [out][in][kh][kw] list, got {len(shape)}-D")
    leaves = _leaves(kernel)
    for leaf in leaves:
        if isinstance(leaf, bool) or not isinstance(leaf, (int, float, str)):
            raise ConvMatrixError(f"kernel entries must be numbers or strings, got {leaf!r}")
        if isinstance(leaf, int) and not INT64_MIN <= leaf <= INT64_MAX:
            raise ConvMatrixError(f"integer kernel entries must fit in 64 bits, got one of {leaf.bit_length()} bits")
        if isinstance(leaf, float) and not math.isfinite(leaf):
            raise ConvMatrixError(f"kernel entries must be finite, got {leaf!r}")
        if isinstance(leaf, str) and not leaf.strip():
            raise ConvMatrixError("kernel symbols must not be empty")
    if any(isinstance(leaf, str) for leaf in leaves):
        array = np.empty(len(leaves), dtype=object)
        array[:] = [leaf.strip() if isinstance(leaf, str) else str(leaf) for leaf in leaves]
    elif all(isinstance(leaf, int) for leaf in leaves):
        array = np.array(leaves, dtype=np.int64)
    else:
        array = np.array(leaves, dtype=np.float64)
    return array.reshape(shape if len(shape) == 4 else (1, 1, *shape))


def conv_matrix_shape(kernel_shape: tuple[int, int, int, int], input_size: Sequence[int], stride=1, padding=0,
                      dilation=1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(input C, H, W) and (output C, H, W) of the convolution, checked; no allocation."""
    c_out, c_k, kh, kw = kernel_shape
    if len(input_size) == 2:
        input_size = (1, *input_size)
    if len(input_size) != 3:
        raise ConvMatrixError(f"input_size must be [H, W] or [C, H, W], got {list(input_size)}")
    c_in, h, w = (int(v) for v in input_size)
    if min(c_in, h, w) < 1:
        raise ConvMatrixError(f"input_size entries must be >= 1, got {list(input_size)}")
    if c_k != c_in:
        raise ConvMatrixError(f"the kernel takes {c_k} input channel(s) but input_size has {c_in}")
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ConvMatrixError("stride and dilation must be >= 1 and padding >= 0")
    out_h, out_w = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    if out_h < 1 or out_w < 1:
        raise EmptyOutputError(
            f"the {kh}x{kw} kernel with dilation {dh}x{dw} spans "
            f"{effective_kernel(kh, dh)}x{effective_kernel(kw, dw)}, more than the {h}x{w} input padded by {ph}x{pw}: the output would be empty")
    return (c_in, h, w), (c_out, out_h, out_w)


def conv_matrix(kernel: Sequence | np.ndarray, input_size: Sequence[int], stride=1, padding=0, dilation=1,
                flip: bool = False, max_entries: int = MAX_ENTRIES) -> ConvMatrix:
    """The matrix M of conv2d with `kernel` on inputs of `input_size` ([H, W] or [C, H, W]); see module doc.

    Raises MatrixTooLargeError before allocating when M would have more than `max_entries` entries,
    EmptyOutputError when the output would be empty, ConvMatrixError for malformed arguments.
    """
    weights = kernel if isinstance(kernel, np.ndarray) else kernel_array(kernel)
    if weights.ndim == 2:
        weights = weights.reshape(1, 1, *weights.shape)
    if weights.ndim != 4:
        raise ConvMatrixError(f"kernel must be 2-D or 4-D, got {weights.ndim}-D")
    (c_in, h, w), (c_out, out_h, out_w) = conv_matrix_shape(weights.shape, input_size, stride, padding, dilation)
    rows, cols = c_out * out_h * out_w, c_in * h * w
    if rows * cols > max_entries:
        raise MatrixTooLargeError(f"the matrix would be {rows}x{cols} = {rows * cols:,} entries, more than the "
                                  f"limit of {max_entries:,}")
    if flip:
        weights = weights[:, :, ::-1, ::-1]
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)

    if weights.dtype == object:
        matrix = np.full((rows, cols), "0", dtype=object)
    else:
        matrix = np.zeros((rows, cols), weights.dtype)
    out_c = np.arange(c_out)[:, None, None, None]
    in_c = np.arange(c_in)[None, :, None, None]
    out_i, out_j = np.arange(out_h), np.arange(out_w)
    for a in range(weights.shape[2]):
        y = out_i * sh - ph + a * dh
        keep_i = (y >= 0) & (y < h)
        for b in range(weights.shape[3]):
            x = out_j * sw - pw + b * dw
            keep_j = (x >= 0) & (x < w)
            i, j, yy, xx = out_i[keep_i], out_j[keep_j], y[keep_i], x[keep_j]
            row = (out_c * out_h + i[:, None]) * out_w + j[None, :]
            col = (in_c * h + yy[:, None]) * w + xx[None, :]
            # Each (row, tap) hits a distinct column, so plain assignment never overwrites a tap.
            taps = weights[:, :, a, b][:, :, None, None]
            matrix[row, col] = np.broadcast_to(taps, np.broadcast_shapes(row.shape, col.shape))
    return ConvMatrix(matrix=matrix, input_shape=(c_in, h, w), output_shape=(c_out, out_h, out_w))


_INDEXED_SYMBOL = re.compile(r"^(-?)([A-Za-z]+)_?(\d+)$")


def latex_entry(entry: Entry) -> str:
    """`w12` -> `w_{12}`; numbers in short form; other strings are taken as LaTeX already."""
    if isinstance(entry, str):
        match = _INDEXED_SYMBOL.match(entry)
        return f"{match[1]}{match[2]}_{{{match[3]}}}" if match else entry
    if isinstance(entry, float):
        return format(entry, ".6g")
    return str(entry)


def to_latex(matrix: np.ndarray | list[list[Entry]]) -> str:
    """`\\begin{bmatrix} a & b \\\\ c & d \\end{bmatrix}`, one matrix row per line.

    amsmath typesets at most 10 columns unless told `\\setcounter{MaxMatrixCols}{N}`.
    """
    rows = matrix.tolist() if isinstance(matrix, np.ndarray) else matrix
    body = " \\\\\n".join(" & ".join(latex_entry(e) for e in row) for row in rows)
    return "\\begin{bmatrix}\n" + body + "\n\\end{bmatrix}"
