"""POST /v1/predict: uploaded images -> the most probable signs."""

from __future__ import annotations

import time
from contextlib import ExitStack

from fastapi import APIRouter, HTTPException, Request

from app.batching import QueueFull, TooManyImages
from app.decoding import decode_uploads
from app.dependencies import get_served_model, require_ready
from app.routers.requests import await_results, multipart_openapi, parse_query, read_uploads
from app.schemas.health import ErrorResponse
from app.schemas.predict import PredictQuery, PredictResponse, predict_response

router = APIRouter(prefix="/v1", tags=["predict"])

@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify uploaded traffic-sign images",
    openapi_extra=multipart_openapi(PredictQuery),
    responses={
        400: {"model": ErrorResponse, "description": "malformed multipart body"},
        404: {"model": ErrorResponse, "description": "unknown model"},
        413: {"model": ErrorResponse, "description": "file over the size limit, too many files (or more than "
                                                      "the queue can hold), an image declaring too many "
                                                      "pixels, or images decoding to more than the request's "
                                                      "pixel budget"},
        415: {"model": ErrorResponse, "description": "the body is not multipart/form-data"},
        422: {"description": "a query parameter out of range (`detail` lists them, as FastAPI does), or a "
                             "file that is missing, empty or not a readable image (`detail` names it)"},
        503: {"model": ErrorResponse, "description": "queue full, models still loading, or a forward worker "
                                                      "restarting; see Retry-After"},
        504: {"model": ErrorResponse, "description": "the images were not classified within the request "
                                                      "deadline, or their forward worker stopped answering"},
    },
)
async def predict(request: Request) -> PredictResponse:
    """Upload one or more images in the multipart field `file` (repeat it for a batch). Each image is
    decoded (first frame of animations, EXIF orientation applied, converted to RGB), resized like
    the training data and classified; the response lists the `top_k` classes per file, in upload order."""
    # The hot path takes its shared state straight from the app, not through Depends(): FastAPI
    # resolves each dependency per request at a cost (tens of microseconds) that showed in profiles.
    query = parse_query(request, PredictQuery)
    service = require_ready(request.app.state.service)
    served, settings, metrics = get_served_model(service, query.model), service.settings, service.metrics
    if not served.kind.classifies:
        raise HTTPException(422, f"{served.name!r} is a {served.kind.name}: it does not classify images"
                                 + (": POST photos to /v1/detect" if served.kind.finds_boxes else ""))
    # top_k and the model are known good before the body is read. From here until the images
    # are queued, the batcher knows this request is coming and may wait for it. A composed model
    # (the ensemble) runs each image through every member, each with its own preprocessing.
    runners = served.runners
    with ExitStack() as announced:
        for runner in runners:
            announced.enter_context(runner.batcher.expecting())
        uploads = await read_uploads(request, settings)
        try:
            for runner in runners:
                runner.batcher.check_admissible(len(uploads))
        except TooManyImages as exc:
            raise HTTPException(413, str(exc)) from None
        inputs = [await decode_uploads(uploads, runner.kind.decoder(runner.loaded), service.decode_budget,
                                       settings.max_image_pixels) for runner in runners]
        started = time.perf_counter()
        futures = []
        for runner, runner_inputs in zip(runners, inputs):
            try:
                futures.append(runner.batcher.submit(runner_inputs))
            except QueueFull as exc:
                metrics.queue_rejections.labels(runner.name).inc()
                raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    # per runner, per image: (class ids, probabilities, sign probability), most probable first
    ranked = served.kind.combine([await await_results(f, settings.request_timeout_s) for f in futures])
    metrics.prediction_duration.labels(served.name).observe(time.perf_counter() - started)
    return predict_response(served, uploads, ranked, query.top_k)
