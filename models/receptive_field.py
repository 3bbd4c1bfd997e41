"""Receptive fields of a stack of conv and pooling layers, along one spatial axis.

For layers l = 1..L with kernel k_l, stride s_l, padding p_l and dilation d_l, the effective kernel is
k'_l = d_l (k_l - 1) + 1 and (Araujo, Norris and Sim, "Computing Receptive Fields of Convolutional
Neural Networks", Distill 2019):

    jump         J_l = J_{l-1} * s_l,                    J_0 = 1   (= prod_{i<=l} s_i)
    field        R_l = R_{l-1} + (k'_l - 1) * J_{l-1},   R_0 = 1
                     = 1 + sum_{j<=l} (k'_j - 1) prod_{i<j} s_i      (closed form)
    start        c_l = c_{l-1} + ((k'_l - 1) / 2 - p_l) * J_{l-1},   c_0 = 0
    output size  n_l = floor((n_{l-1} + 2 p_l - k'_l) / s_l) + 1

`start` is the input coordinate of the centre of the first output unit's field, with input pixel i
centred at coordinate i; unit u of layer l is centred at c_l + u J_l and sees the input pixels
[c_l + u J_l - (R_l - 1)/2, c_l + u J_l + (R_l - 1)/2], clipped to the image (padding is zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.conv_shapes import EmptyOutputError, conv_output_size, effective_kernel

if TYPE_CHECKING:  # torch is imported only to read real modules, so the pure math (and the CLI) start fast
    from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """One conv or pooling layer along one axis, with torch's defaults."""

    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False
    name: str | None = None
    kind: str = "conv"

    def __post_init__(self) -> None:
        for field, value, least in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                                    ("padding", self.padding, 0), ("dilation", self.dilation, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{field} must be an integer >= {least}, got {value!r}")

    @property
    def effective_kernel(self) -> int:
        return effective_kernel(self.kernel_size, self.dilation)


@dataclass(frozen=True)
class ReceptiveFieldRow:
    """The field of the units after `layer` (1-based), and the layer itself."""

    layer: int
    name: str | None
    kind: str
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    receptive_field: int
    receptive_field_closed_form: int
    jump: int
    output_size: int
    start: float


class LayerDoesNotFitError(EmptyOutputError):
    """Layer `layer` (1-based) would produce an empty output from its `input_size`-position input."""

    def __init__(self, layer: int, spec: LayerSpec, input_size: int) -> None:
        self.layer, self.spec, self.input_size = layer, spec, input_size
        label = f"layer {layer}" + (f" ({spec.name})" if spec.name else "")
        super().__init__(
            f"{label}: its kernel spans {spec.effective_kernel} positions (kernel {spec.kernel_size}, dilation "
            f"{spec.dilation}) but its input has {input_size} positions plus padding {spec.padding} on each side, "
            f"so its output would be empty")


# Beyond 2^53 the jump (and the start coordinate) are no longer exact as floats; no real network gets near.
MAX_JUMP = 2 ** 53


class JumpTooLargeError(ValueError):
    """The product of the strides up to layer `layer` (1-based) exceeds MAX_JUMP."""

    def __init__(self, layer: int, spec: LayerSpec, jump: int) -> None:
        self.layer, self.spec, self.jump = layer, spec, jump
        label = f"layer {layer}" + (f" ({spec.name})" if spec.name else "")
        super().__init__(f"{label}: the strides up to here multiply to {jump:.3g}, more than 2^53 input pixels "
                         f"between neighbouring units (no input is that large)")


def closed_form_receptive_field(layers: list[LayerSpec]) -> int:
    """1 + sum_j (k'_j - 1) prod_{i<j} s_i, computed from scratch (no recursion)."""
    return 1 + sum((spec.effective_kernel - 1) * math.prod(s.stride for s in layers[:j])
                   for j, spec in enumerate(layers))


def receptive_field_table(input_size: int, layers: list[LayerSpec]) -> list[ReceptiveFieldRow]:
    """One row per layer: R_l by the recursion and by the closed form, J_l, n_l and c_l (see module doc).

    Raises `LayerDoesNotFitError` naming the first layer whose output would be empty.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    rows: list[ReceptiveFieldRow] = []
    field, jump, twice_start, size = 1, 1, 0, input_size  # 2 c_l: exact integers, no float overflow
    for index, spec in enumerate(layers, start=1):
        out = conv_output_size(size, spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.ceil_mode)
        if out < 1:
            raise LayerDoesNotFitError(index, spec, size)
        field += (spec.effective_kernel - 1) * jump
        twice_start += (spec.effective_kernel - 1 - 2 * spec.padding) * jump
        jump *= spec.stride
        if jump > MAX_JUMP:
            raise JumpTooLargeError(index, spec, jump)
        start = twice_start / 2
        size = out
        rows.append(ReceptiveFieldRow(
            layer=index, name=spec.name, kind=spec.kind, kernel_size=spec.kernel_size, stride=spec.stride,
            padding=spec.padding, dilation=spec.dilation, receptive_field=field,
            receptive_field_closed_form=closed_form_receptive_field(layers[:index]),
            jump=jump, output_size=size, start=start))
    return rows


def _along(value: int | tuple[int, ...], axis: int) -> int:
    return value if isinstance(value, int) else int(value[axis])


def _conv_padding(conv: nn.Conv2d, axis: int) -> int:
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        span = effective_kernel(_along(conv.kernel_size, axis), _along(conv.dilation, axis))
        if span % 2 == 0:
            raise ValueError(f"padding='same' with the even span {span} pads unevenly; not a symmetric layer")
        return (span - 1) // 2
    return _along(conv.padding, axis)


def layer_spec_of(module: nn.Module, name: str | None = None, axis: int = 0) -> LayerSpec | None:
    """The LayerSpec of a Conv2d, MaxPool2d or AvgPool2d (along `axis`: 0 height, 1 width); else None."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return LayerSpec(_along(module.kernel_size, axis), _along(module.stride, axis), _conv_padding(module, axis),
                         _along(module.dilation, axis), name=name, kind="conv")
    if isinstance(module, nn.MaxPool2d):
        return LayerSpec(_along(module.kernel_size, axis), _along(module.stride, axis), _along(module.padding, axis),
                         _along(module.dilation, axis), module.ceil_mode, name=name, kind="maxpool")
    if isinstance(module, nn.AvgPool2d):
        return LayerSpec(_along(module.kernel_size, axis), _along(module.stride, axis), _along(module.padding, axis),
                         1, module.ceil_mode, name=name, kind="avgpool")
    return None


def layers_of_module(module: nn.Module, axis: int = 0) -> list[LayerSpec]:
    """Every Conv2d, MaxPool2d and AvgPool2d of `module` along its deepest path, named as in named_modules().

    Submodules are visited in registration order, which is the order they run in for Sequential stacks
    (SignCNN) and torchvision's ResNets. A child called `downsample` is torchvision's residual shortcut
    (a strided 1x1 conv): it runs beside the block's main path and sees a subset of its field, so it adds
    no depth and is skipped. Adaptive pools are skipped too: their window depends on the input size, and
    the global pool of a classifier makes every unit see the whole image anyway.
    """
    specs: list[LayerSpec] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            if child_name == "downsample":
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            spec = layer_spec_of(child, name, axis)
            if spec is not None:
                specs.append(spec)
            else:
                walk(child, name)

    walk(module, "")
    return specs
