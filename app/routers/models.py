"""GET /v1/models...: what is served, and how each model trained."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from app.dependencies import Model, ReadyService
from app.plots import curves, training_curves_png
from app.schemas.health import ErrorResponse
from app.kinds import ServedModel
from app.schemas.models import BackendInfo, CalibrationInfo, EpochMetrics, ModelInfo, ModelList, TrainingMetrics
from models.checkpoint import metrics_csv

router = APIRouter(prefix="/v1/models", tags=["models"],
                   responses={503: {"model": ErrorResponse, "description": "models still loading"}})

NOT_FOUND = {404: {"model": ErrorResponse, "description": "unknown model"}}


def model_info(served: ServedModel, running: list[str]) -> ModelInfo:
    """The common fields from the checkpoint (a composed model has none), then its kind's own."""
    m, backend = served.loaded, served.backend
    common = {} if m is None else {
        "architecture": m.architecture, "parameters": m.parameters, "input_size": m.preprocessing.input_size,
        "epochs": len(m.metrics), "start_weights": m.start_weights, "checkpoint_sha256": m.sha256,
        "device": str(m.device),
        "calibration": CalibrationInfo.from_report(m.calibration.report, m.calibration.rule,
                                                   m.calibration.temperature)}
    return ModelInfo(name=served.name, kind=served.kind.name, test_accuracy=served.test_accuracy,
                     backend=BackendInfo(**backend.to_dict(), running=running, choosing=served.choosing)
                     if backend else None, **{**common, **served.kind.describe(served)})


@router.get("", response_model=ModelList, summary="The served models")
def list_models(service: ReadyService) -> ModelList:
    return ModelList(models=[model_info(served, service.running_backends(name))
                             for name, served in service.models.items()],
                     default=service.best(), skipped=service.skipped())


@router.get("/{name}", response_model=ModelInfo, responses=NOT_FOUND, summary="One served model")
def get_model(model: Model, service: ReadyService) -> ModelInfo:
    return model_info(model, service.running_backends(model.name))


@router.get("/{name}/metrics", response_model=TrainingMetrics, responses=NOT_FOUND,
            response_model_exclude_none=True, summary="Per-epoch training metrics")
def training_metrics(model: Model) -> TrainingMetrics:
    return TrainingMetrics(epochs=[EpochMetrics(**m) for m in model.training_metrics])


@router.get("/{name}/metrics.csv", response_class=Response, responses={
    200: {"content": {"text/csv": {}}, "description": "one row per epoch"}, **NOT_FOUND},
    summary="Per-epoch training metrics as CSV")
def get_metrics_csv(model: Model) -> Response:
    return Response(metrics_csv(model.training_metrics), media_type="text/csv",
                    headers={"Content-Disposition": f'inline; filename="{model.name}-metrics.csv"'})


@router.get("/{name}/metrics.png", response_class=Response, responses={
    200: {"content": {"image/png": {}}, "description": "losses and accuracy (or detection figures) per epoch"},
    **NOT_FOUND}, summary="Training curves plot")
async def get_metrics_png(model: Model) -> Response:
    info = model_info(model, [])
    png = await run_in_threadpool(training_curves_png, *curves(model.training_metrics),
                                  f"{model.name} ({info.architecture}, {info.start_weights} start)")
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})
