"""Requests and responses of the calculators: receptive field, conv layer, conv as a matrix.

Every number has bounds, so no request can ask for unbounded work; the conv-matrix route also checks
the size of the matrix itself before building it (models.conv_matrix.MAX_ENTRIES).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    model_validator,
)

MAX_INPUT = 16_384
MAX_WINDOW = 1_024
MAX_KERNEL_ENTRIES = 65_536

Kernel = Annotated[int, Field(ge=1, le=MAX_WINDOW)]
Stride = Annotated[int, Field(ge=1, le=MAX_WINDOW)]
Padding = Annotated[int, Field(ge=0, le=MAX_WINDOW)]
Dilation = Annotated[int, Field(ge=1, le=MAX_WINDOW)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- receptive field ---------------------------------------------------------------------------------

class LayerIn(_Strict):
    kernel_size: Kernel
    stride: Stride = 1
    padding: Padding = 0
    dilation: Dilation = 1
    ceil_mode: StrictBool = Field(False, description="round the output size up, as pooling layers may")
    name: Annotated[str, StringConstraints(max_length=64)] | None = Field(None, description="a label for the row")


class ReceptiveFieldRequest(_Strict):
    input_size: int = Field(..., ge=1, le=MAX_INPUT, description="side of the square input, in pixels")
    layers: list[LayerIn] = Field(..., min_length=1, max_length=256,
                                  description="conv and pooling layers, input first")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"input_size": 32, "layers": [{"kernel_size": 5, "stride": 1, "padding": 0, "dilation": 1}] * 4}]})


class ReceptiveFieldRow(BaseModel):
    layer: int = Field(..., description="1-based position in the stack")
    name: str | None = None
    kind: str = Field(..., description="conv, maxpool or avgpool")
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    receptive_field: int = Field(..., description="R_l = R_{l-1} + (k'_l - 1) prod_{i<l} s_i, R_0 = 1, "
                                                  "k' = d(k - 1) + 1")
    receptive_field_closed_form: int = Field(..., description="1 + sum_j (k'_j - 1) prod_{i<j} s_i")
    jump: int = Field(..., description="prod_{i<=l} s_i: input pixels between neighbouring units")
    output_size: int = Field(..., description="floor((n + 2p - d(k - 1) - 1) / s) + 1")
    start: float = Field(..., description="input coordinate (pixel i at i) of the centre of the first unit's field")


class ReceptiveFieldResponse(BaseModel):
    layers: list[ReceptiveFieldRow]


class ModelReceptiveFieldResponse(ReceptiveFieldResponse):
    model: str
    architecture: str
    input_size: int = Field(..., description="the side the table was computed for")


# --- conv layer ----------------------------------------------------------------------------------------

class Shape(_Strict):
    height: int = Field(..., ge=1, le=MAX_INPUT)
    width: int = Field(..., ge=1, le=MAX_INPUT)
    channels: int = Field(..., ge=1, le=65_536)


class ConvLayerRequest(_Strict):
    input_shape: Shape
    filters: int = Field(..., ge=1, le=65_536, description="output channels")
    kernel_size: Kernel | tuple[Kernel, Kernel] = Field(..., description="k or [kh, kw]")
    stride: Stride | tuple[Stride, Stride] = 1
    padding: Padding | tuple[Padding, Padding] = 0
    dilation: Dilation | tuple[Dilation, Dilation] = 1
    bias: StrictBool = True

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"input_shape": {"height": 32, "width": 32, "channels": 3}, "filters": 10, "kernel_size": 5}]})


class OutputShape(BaseModel):
    """A layer's output: padding can make it larger than any input the calculators accept."""

    height: int
    width: int
    channels: int


class ConvLayerResponse(BaseModel):
    output_shape: OutputShape
    parameters: int = Field(..., description="filters * channels * kh * kw, + filters with a bias")
    multiply_adds: int = Field(..., description="out_h * out_w * filters * channels * kh * kw (bias adds not counted)")


# --- conv as a matrix ----------------------------------------------------------------------------------

Symbol = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
Entry = Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)] | Annotated[StrictFloat, Field(allow_inf_nan=False)] \
    | Symbol
Row = Annotated[list[Entry], Field(min_length=1, max_length=32)]
Kernel2D = Annotated[list[Row], Field(min_length=1, max_length=32)]
Kernel4D = Annotated[list[Annotated[list[Kernel2D], Field(min_length=1, max_length=32)]],
                     Field(min_length=1, max_length=32)]
Side = Annotated[int, Field(ge=1, le=4_096)]
Step = Annotated[int, Field(ge=1, le=64)]
Pad = Annotated[int, Field(ge=0, le=64)]


class ConvMatrixRequest(_Strict):
    kernel: Kernel2D | Kernel4D = Field(..., description="[kh][kw], or [out][in][kh][kw]; numbers, or strings "
                                                          "for a symbolic matrix")
    input_size: Annotated[list[Side], Field(min_length=2, max_length=3)] = Field(..., description="[H, W] or [C, H, W]")
    stride: Step | tuple[Step, Step] = 1
    padding: Pad | tuple[Pad, Pad] = 0
    dilation: Step | tuple[Step, Step] = 1
    flip: StrictBool = Field(False, description="flip the kernel first: true convolution instead of conv2d's "
                                          "cross-correlation")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"kernel": [["w1", "w2"], ["w3", "w4"]], "input_size": [3, 3]}]})

    @model_validator(mode="after")
    def _kernel_not_too_big(self) -> "ConvMatrixRequest":
        entries, level = 1, self.kernel
        while isinstance(level, list):  # rectangularity is checked later, by the math itself
            entries, level = entries * len(level), level[0]
        if entries > MAX_KERNEL_ENTRIES:
            raise ValueError(f"the kernel has {entries:,} entries, more than {MAX_KERNEL_ENTRIES:,}")
        return self


class ConvMatrixResponse(BaseModel):
    matrix: list[list[Entry]] = Field(..., description="rows: output positions; columns: unpadded input pixels, "
                                                         "both flattened channel-major then row-major")
    # lists of fixed length rather than tuples: the same JSON, a schema every OpenAPI 3.1 tool reads
    shape: list[int] = Field(..., min_length=2, max_length=2, description="rows, columns")
    input_shape: list[int] = Field(..., min_length=3, max_length=3, description="C, H, W")
    output_shape: list[int] = Field(..., min_length=3, max_length=3, description="C, H, W")
    latex: str | None = Field(..., description="a bmatrix; null above models.conv_matrix.LATEX_MAX_ENTRIES")
