"""GET /v1/models...: what is served, and how each model trained."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from app.dependencies import Model, ReadyService
from app.plots import curves, training_curves_png
from app.schemas.health import ErrorResponse
from app.schemas.models import BackendInfo, CalibrationInfo, EpochMetrics, ModelInfo, ModelList, TrainingMetrics
from app.service import Service
from models.backends import BackendRecord
from models.checkpoint import LoadedModel, metrics_csv
from models.ensemble import ENSEMBLE_NAME

router = APIRouter(prefix="/v1/models", tags=["models"],
                   responses={503: {"model": ErrorResponse, "description": "models still loading"}})

NOT_FOUND = {404: {"model": ErrorResponse, "description": "unknown model"}}


def calibration_info(m: LoadedModel) -> CalibrationInfo | None:
    report = m.calibration.report
    if not report:
        return None
    before, after = report.get("before", {}), report.get("after", {})
    test, background = after.get("test", {}), after.get("background_validation", {})
    return CalibrationInfo(
        temperature=None if m.ensemble is not None and m.architecture == ENSEMBLE_NAME else m.calibration.temperature,
        min_confidence=m.calibration.rule.min_confidence,
        test_ece_before=before.get("test", {}).get("ece"), test_ece=test.get("ece"),
        test_nll_before=before.get("test", {}).get("nll"), test_nll=test.get("nll"),
        test_recognized=test.get("recognized"), test_accuracy_recognized=test.get("accuracy_recognized"),
        background_rejected=background.get("rejected"), validation_accuracy=report.get("validation_accuracy"))


def model_info(m: LoadedModel, backend: BackendRecord | None, running: list[str]) -> ModelInfo:
    detector = m.architecture == "detector"
    validation = {k: v for k, v in m.metrics[-1].items() if k.startswith("val_")} if detector and m.metrics else None
    members = list(m.ensemble.members) if m.ensemble is not None and m.architecture == ENSEMBLE_NAME else None
    return ModelInfo(name=m.name, kind="detector" if detector else "classifier", architecture=m.architecture,
                     parameters=m.parameters, input_size=m.preprocessing.input_size, test_accuracy=m.test_accuracy,
                     validation=validation, score_threshold=m.inference.get("score_threshold"),
                     epochs=len(m.metrics), start_weights=m.start_weights, checkpoint_sha256=m.sha256,
                     device=str(m.device),
                     backend=BackendInfo(**backend.to_dict(), running=running) if backend else None,
                     members=members, calibration=calibration_info(m))


@router.get("", response_model=ModelList, summary="The served models")
def list_models(service: ReadyService) -> ModelList:
    return ModelList(models=[model_info(served.loaded, served.backend, service.running_backends(name))
                             for name, served in service.models.items()],
                     default=service.best(), skipped=service.skipped())


@router.get("/{name}", response_model=ModelInfo, responses=NOT_FOUND, summary="One served model")
def get_model(model: Model, service: ReadyService) -> ModelInfo:
    served = service.models[model.name]
    return model_info(model, served.backend, service.running_backends(model.name))


@router.get("/{name}/metrics", response_model=TrainingMetrics, responses=NOT_FOUND,
            response_model_exclude_none=True, summary="Per-epoch training metrics")
def training_metrics(model: Model) -> TrainingMetrics:
    return TrainingMetrics(epochs=[EpochMetrics(**m) for m in model.metrics])


@router.get("/{name}/metrics.csv", response_class=Response, responses={
    200: {"content": {"text/csv": {}}, "description": "one row per epoch"}, **NOT_FOUND},
    summary="Per-epoch training metrics as CSV")
def get_metrics_csv(model: Model) -> Response:
    return Response(metrics_csv(model.metrics), media_type="text/csv",
                    headers={"Content-Disposition": f'inline; filename="{model.name}-metrics.csv"'})


@router.get("/{name}/metrics.png", response_class=Response, responses={
    200: {"content": {"image/png": {}}, "description": "losses and accuracy (or detection figures) per epoch"},
    **NOT_FOUND}, summary="Training curves plot")
async def get_metrics_png(model: Model) -> Response:
    title = f"{model.name} ({model.architecture}, {model.start_weights} start)"
    png = await run_in_threadpool(training_curves_png, *curves(model.metrics), title)
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})
