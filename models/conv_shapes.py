"""Output shape, parameter count and multiply-adds of a 2-D convolution layer.

Everything follows `torch.nn.Conv2d`: along one axis, an input of n positions, kernel k, stride s,
zero padding p (each side) and dilation d give

    out = floor((n + 2p - d(k - 1) - 1) / s) + 1

output positions. Kernel, stride, padding and dilation may each be one int (both axes) or a pair
(height, width).
"""

from __future__ import annotations

from dataclasses import dataclass

IntOrPair = int | tuple[int, int]


class EmptyOutputError(ValueError):
    """The layer's window does not fit in its (padded) input, so the output would have no positions."""


def pair(value: IntOrPair | list[int]) -> tuple[int, int]:
    """`3` -> (3, 3); `(3, 5)` -> (3, 5)."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def effective_kernel(kernel_size: int, dilation: int = 1) -> int:
    """The span of a dilated kernel: d(k - 1) + 1."""
    return dilation * (kernel_size - 1) + 1


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """Output positions along one axis: floor((n + 2p - d(k-1) - 1) / s) + 1.

    `ceil_mode` rounds up instead, as pooling layers may; like torch, a last window that would start
    inside the right padding is then dropped. The result is < 1 when the layer does not fit.
    """
    span = size + 2 * padding - effective_kernel(kernel_size, dilation)
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


@dataclass(frozen=True)
class ConvLayerResult:
    output_height: int
    output_width: int
    output_channels: int
    parameters: int
    multiply_adds: int


def conv_layer(input_height: int, input_width: int, input_channels: int, filters: int, kernel_size: IntOrPair,
               stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
               bias: bool = True) -> ConvLayerResult:
    """Shape and cost of `nn.Conv2d(input_channels, filters, kernel_size, stride, padding, dilation, bias=bias)`.

    parameters    = filters * input_channels * kh * kw  (+ filters when bias)
    multiply_adds = out_h * out_w * filters * input_channels * kh * kw

    A multiply-add is one weight times one input, added to a sum; the bias additions are not counted
    (the usual "MACs" convention). Raises `EmptyOutputError` when the output would be empty and
    ValueError for sizes below 1 (padding below 0).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    for what, values, least in (("input size", (input_height, input_width, input_channels), 1),
                                ("filters", (filters,), 1), ("kernel_size", (kh, kw), 1), ("stride", (sh, sw), 1),
                                ("padding", (ph, pw), 0), ("dilation", (dh, dw), 1)):
        if min(values) < least:
            raise ValueError(f"{what} must be >= {least}, got {values if len(values) > 1 else values[0]}")
    out_h = conv_output_size(input_height, kh, sh, ph, dh)
    out_w = conv_output_size(input_width, kw, sw, pw, dw)
    if out_h < 1 or out_w < 1:
        raise EmptyOutputError(
            f"a {kh}x{kw} kernel with dilation {dh}x{dw} (span {effective_kernel(kh, dh)}x{effective_kernel(kw, dw)}) "
            f"does not fit a {input_height}x{input_width} input padded by {ph}x{pw}: the output would be empty "
            f"({max(out_h, 0)}x{max(out_w, 0)})")
    weights = filters * input_channels * kh * kw
    return ConvLayerResult(
        output_height=out_h,
        output_width=out_w,
        output_channels=filters,
        parameters=weights + (filters if bias else 0),
        multiply_adds=out_h * out_w * weights,
    )
