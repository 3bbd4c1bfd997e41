"""POST /v1/predict: uploaded images -> the most probable signs."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from app.batching import QueueFull, TooManyImages
from app.dependencies import get_served_model, require_ready
from app.decoding import decode_uploads
from app.imaging import InputDecoder
from app.schemas.health import ErrorResponse
from app.schemas.predict import PredictQuery, PredictResponse, predict_response
from app.service import ServedModel
from app.settings import Settings
from app.uploads import FILE_FIELD, Upload, read_request_files
from app.workers import WorkerDied, WorkerHung
from models.ensemble import combine_ranked

router = APIRouter(prefix="/v1", tags=["predict"])
Q = TypeVar("Q", bound=BaseModel)

# The body is read in the route (to enforce limits while it streams), so FastAPI cannot
# derive its schema from a parameter: this is what `list[UploadFile] = File(...)` would document.
# The query is validated in the route too (see `parse_query`), so its parameters are documented here.
def query_parameters(query: type[BaseModel]) -> list[dict]:
    """OpenAPI query parameters for a route that validates its query with `query` itself."""
    return [{"name": name, "in": "query", "required": False, "description": schema.get("description"),
             "schema": {k: v for k, v in schema.items() if k != "description"}}
            for name, schema in query.model_json_schema()["properties"].items()]


OPENAPI_EXTRA = {
    "parameters": query_parameters(PredictQuery),
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [FILE_FIELD],
            "properties": {FILE_FIELD: {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "format": "binary"},
                "description": "one or more images (PNG, JPEG, PPM, WebP, BMP, GIF, ...); repeat the "
                               "field for a batch",
            }},
        }}},
    },
}


def parse_query(request: Request, query: type[Q] = PredictQuery) -> Q:
    """The query string as `query`; a bad value answers 422 exactly as FastAPI's own validation
    does. Declaring the parameters in the signature instead made FastAPI introspect their type
    annotations on every request, about a sixth of the route's CPU time in profiles."""
    try:
        return query.model_validate(request.query_params)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)])


async def read_uploads(request: Request, settings: Settings) -> list[Upload]:
    return await read_request_files(request, field_name=FILE_FIELD, max_files=settings.max_files_per_request,
                                    max_bytes=settings.max_upload_bytes)


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify uploaded traffic-sign images",
    openapi_extra=OPENAPI_EXTRA,
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
    query = parse_query(request)
    service = require_ready(request.app.state.service)
    served, settings, metrics = get_served_model(service, query.model), service.settings, service.metrics
    if served.loaded.architecture == "detector":
        raise HTTPException(422, f"{served.loaded.name!r} is a detector: POST photos to /v1/detect")
    # top_k and the model are known good before the body is read. From here until the images
    # are queued, the batcher knows this request is coming and may wait for it. An ensemble runs
    # each image through every member (each with its own preprocessing) and averages their answers.
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
        inputs = [await decode_uploads(uploads, InputDecoder(runner.loaded.preprocessing), service.decode_budget,
                                       settings.max_image_pixels) for runner in runners]
        started = time.perf_counter()
        futures = []
        for runner, runner_inputs in zip(runners, inputs):
            try:
                futures.append(runner.batcher.submit(runner_inputs))
            except QueueFull as exc:
                metrics.queue_rejections.labels(runner.loaded.name).inc()
                raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    # per runner, per image: (class ids, probabilities, sign probability), most probable first
    per_runner = [await await_results(f, settings.request_timeout_s) for f in futures]
    ranked = per_runner[0] if len(per_runner) == 1 else [combine_ranked(answers) for answers in zip(*per_runner)]
    metrics.prediction_duration.labels(served.loaded.name).observe(time.perf_counter() - started)
    return predict_response(served.loaded, uploads, ranked, query.top_k)


async def await_results(futures: list[asyncio.Future], timeout_s: float, deadline: float | None = None) -> list:
    """The queued images' results, in order; 504 past the request's deadline (`timeout_s` from now, or
    the loop time `deadline` of a request that waits in several steps; its images still queued are
    dropped) or when the forward worker hung, 503 + Retry-After when it died."""
    try:
        async with asyncio.timeout_at(deadline if deadline is not None else
                                      asyncio.get_running_loop().time() + timeout_s):
            return await asyncio.gather(*futures)
    except TimeoutError:
        for future in futures:
            future.cancel()
        raise HTTPException(504, f"the model did not answer within {timeout_s:g} s "
                                 f"(SIGNSERVE_REQUEST_TIMEOUT_S)") from None
    except WorkerHung as exc:
        raise HTTPException(504, str(exc)) from None
    except WorkerDied as exc:  # already replaced; the client may simply retry
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None

