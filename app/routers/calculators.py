"""Calculators: receptive fields, conv layer shapes and costs, convolution as a matrix.

The math is in models/ (receptive_field, conv_shapes, conv_matrix); these routes validate, call it,
and turn its domain errors into 422s in FastAPI's own error format. The routes are plain `def`, so
FastAPI runs them in its thread pool and a big matrix does not stall the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from app.dependencies import Model
from app.schemas.health import ErrorResponse
from app.schemas.calculators import (
    ConvLayerRequest,
    ConvLayerResponse,
    ConvMatrixRequest,
    ConvMatrixResponse,
    ModelReceptiveFieldResponse,
    ReceptiveFieldRequest,
    ReceptiveFieldResponse,
)
from models.calc import conv_layer_answer, conv_matrix_answer, receptive_field_answer
from models.checkpoint import unwrap
from models.conv_matrix import ConvMatrixError, MatrixTooLargeError, conv_matrix
from models.conv_shapes import EmptyOutputError, conv_layer
from models.receptive_field import (
    JumpTooLargeError,
    LayerDoesNotFitError,
    LayerSpec,
    layers_of_module,
    receptive_field_table,
)

router = APIRouter(tags=["calculators"])


def _unprocessable(kind: str, message: str, loc: tuple = ("body",)) -> HTTPException:
    return HTTPException(422, detail=[{"type": kind, "loc": list(loc), "msg": message}])


def _table(input_size: int, layers: list[LayerSpec], loc: tuple, per_layer: bool) -> dict:
    try:
        return receptive_field_answer(receptive_field_table(input_size, layers))
    except LayerDoesNotFitError as exc:
        raise _unprocessable("empty_output", str(exc), (*loc, exc.layer - 1) if per_layer else loc) from exc
    except JumpTooLargeError as exc:
        raise _unprocessable("value_error", str(exc), (*loc, exc.layer - 1) if per_layer else loc) from exc


@router.post("/v1/calculators/receptive-field", response_model=ReceptiveFieldResponse)
def receptive_field(request: ReceptiveFieldRequest) -> dict:
    """Receptive field, jump, output size and field centre after each layer of a conv/pool stack."""
    layers = [LayerSpec(**layer.model_dump()) for layer in request.layers]
    return _table(request.input_size, layers, ("body", "layers"), per_layer=True)


@router.get("/v1/models/{name}/receptive-field", response_model=ModelReceptiveFieldResponse, responses={
    404: {"model": ErrorResponse, "description": "unknown model"},
    503: {"model": ErrorResponse, "description": "models still loading"}})
def model_receptive_field(
    model: Model,
    input_size: Annotated[int | None, Query(ge=1, le=4_096, description="defaults to the model's input size")] = None,
) -> dict:
    """The table for a served model, read off its modules: every conv and pool layer along the deepest
    path (ResNet shortcuts skipped, as they add no depth)."""
    try:
        module = model.kind.layers(model)
    except ValueError as exc:  # a model without layers of its own (the ensemble)
        raise HTTPException(422, str(exc)) from None
    size = input_size or model.loaded.preprocessing.input_size
    return {"model": model.name, "architecture": model.loaded.architecture, "input_size": size,
            **_table(size, layers_of_module(unwrap(module)), ("query", "input_size"), per_layer=False)}


@router.post("/v1/calculators/conv-layer", response_model=ConvLayerResponse)
def conv_layer_shape(request: ConvLayerRequest) -> dict:
    """Output shape, parameter count and multiply-adds of one Conv2d."""
    shape = request.input_shape
    try:
        result = conv_layer(shape.height, shape.width, shape.channels, request.filters, request.kernel_size,
                            request.stride, request.padding, request.dilation, request.bias)
    except EmptyOutputError as exc:
        raise _unprocessable("empty_output", str(exc)) from exc
    return conv_layer_answer(result)


@router.post("/v1/calculators/conv-matrix", response_model=ConvMatrixResponse)
def convolution_matrix(request: ConvMatrixRequest) -> dict:
    """The matrix M with conv2d(x, kernel).flatten() == M @ x.flatten() (symbolic for string kernels)."""
    try:
        result = conv_matrix(request.kernel, request.input_size, request.stride, request.padding,
                             request.dilation, flip=request.flip)
    except MatrixTooLargeError as exc:
        raise _unprocessable("matrix_too_large", str(exc)) from exc
    except EmptyOutputError as exc:
        raise _unprocessable("empty_output", str(exc)) from exc
    except ConvMatrixError as exc:
        raise _unprocessable("value_error", str(exc)) from exc
    return conv_matrix_answer(result)
