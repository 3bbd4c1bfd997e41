"""POST /v1/detect: street photos -> every sign in them, boxed and named."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from app.batching import QueueFull
from app.dependencies import get_served_model, require_ready
from app.routers.predict import OPENAPI_EXTRA, await_results, parse_query, query_parameters, read_uploads
from app.decoding import decode_uploads
from app.imaging import SceneDecoder
from app.schemas.detect import DetectQuery, DetectResponse, FrameResult, Sign
from app.schemas.health import ErrorResponse
from app.service import ServedModel, Service
from models.calibration import is_recognized
from models.detector import GROUPS, classifier_crops
from models.preprocessing import image_to_uint8

router = APIRouter(prefix="/v1", tags=["detect"])

DETECT_OPENAPI = {**OPENAPI_EXTRA, "parameters": query_parameters(DetectQuery)}


def get_detector(service: Service) -> ServedModel:
    detectors = [m for m in service.models.values() if m.loaded.architecture == "detector"]
    if not detectors:
        raise HTTPException(404, "no detector is served (train one with `make train MODEL=detector` and put "
                                 "detector.pt in the checkpoint directory)")
    return detectors[0]


def names_boxes(served: ServedModel) -> bool:
    """A classifier with a batcher of its own (the ensemble runs through its members' batchers)."""
    return served.batcher is not None and served.loaded.architecture != "detector"


async def submit(served: ServedModel, images: list, service: Service, deadline: float) -> list:
    """Queue images on a model's batcher and wait for their results, in chunks of a quarter of its queue:
    the boxes of many frames can outnumber the whole queue (thousands at a low min_score), and a
    request that waits for each chunk in turn leaves room for other clients' images. 503 when even a
    chunk does not fit now; the same deadline (504), hung-worker (504) and dead-worker (503) answers as
    /v1/predict, the deadline counted once for the whole request."""
    chunk = max(1, served.batcher.queue_size // 4)
    results: list = []
    for start in range(0, len(images), chunk):
        try:
            futures = served.batcher.submit(images[start:start + chunk])
        except QueueFull as exc:
            service.metrics.queue_rejections.labels(served.loaded.name).inc()
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        results += await await_results(futures, service.settings.request_timeout_s, deadline=deadline)
    return results


@router.post(
    "/detect",
    response_model=DetectResponse,
    summary="Find and name every traffic sign in street photos",
    openapi_extra=DETECT_OPENAPI,
    responses={
        400: {"model": ErrorResponse, "description": "malformed multipart body"},
        404: {"model": ErrorResponse, "description": "no detector served, or unknown classifier"},
        413: {"model": ErrorResponse, "description": "file over the size limit, too many files, or an "
                                                      "image declaring too many pixels"},
        415: {"model": ErrorResponse, "description": "the body is not multipart/form-data"},
        422: {"description": "a query parameter out of range, or a file that is missing, empty or not a "
                             "readable image (`detail` names it)"},
        503: {"model": ErrorResponse, "description": "queue full, models still loading, or a forward worker "
                                                      "restarting; see Retry-After"},
        504: {"model": ErrorResponse, "description": "the photos were not answered within the request "
                                                      "deadline, or their forward worker stopped answering"},
    },
)
async def detect(request: Request) -> DetectResponse:
    """Upload one or more photos in the multipart field `file` (repeat it for a batch). Each is
    decoded (reduced on decode to the detector's input where the format allows, EXIF orientation
    applied), the detector finds the signs, and the classifier names each box from a crop of the
    photo; boxes are in the uploaded image's pixels, best first."""
    query = parse_query(request, DetectQuery)
    service = require_ready(request.app.state.service)
    detector = get_detector(service)
    if query.classifier in service.models and not names_boxes(service.models[query.classifier]):
        namers = [n for n, m in service.models.items() if names_boxes(m)]
        raise HTTPException(422, f"{query.classifier!r} cannot name boxes; classifier= takes one of "
                                 f"{', '.join(namers)}")
    classifier = get_served_model(service, query.classifier, names_boxes, role="classifier")
    settings, pre = service.settings, detector.loaded.preprocessing
    min_score = query.min_score if query.min_score is not None else \
        detector.loaded.inference.get("score_threshold", 0.3)
    with detector.batcher.expecting():
        uploads = await read_uploads(request, settings)
        # upright RGB, reduced while decoded to the detector's input (its longest side)
        scenes = await decode_uploads(uploads, SceneDecoder(pre.input_size), service.decode_budget,
                                      settings.max_image_pixels)
        frames = [image_to_uint8(s.image, pre) for s in scenes]
    # no longer announced once its frames are ready: a batch must not wait for more of them
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    found = await submit(detector, frames, service, deadline)
    kept = [[f for f in frame_found if f[1] >= min_score] for frame_found in found]
    crops = [await run_in_threadpool(classifier_crops, scene.image, [f[0] for f in signs],
                                     classifier.loaded.preprocessing)
             for scene, signs in zip(scenes, kept) if signs]
    ranked = await submit(classifier, [c for batch in crops for c in batch], service, deadline) if crops else []
    service.metrics.prediction_duration.labels(detector.loaded.name).observe(time.perf_counter() - started)
    labels, answers, position = classifier.loaded.class_names, [], 0
    for upload, scene, signs in zip(uploads, scenes, kept):
        (sx, sy), (width, height), named = scene.scale, scene.original_size, []
        for (x1, y1, x2, y2), score, group in signs:
            class_ids, probabilities, sign_probability = ranked[position][:3]
            position += 1
            # the classifier's verdict on the crop: a box that is none of the 43 signs is dropped
            if not is_recognized(probabilities[0], sign_probability, classifier.loaded.calibration.rule):
                continue
            box = (max(0.0, x1 * sx), max(0.0, y1 * sy), min(float(width), x2 * sx), min(float(height), y2 * sy))
            named.append(Sign(box=tuple(round(v, 1) for v in box), score=score, group=GROUPS[group],
                              class_id=class_ids[0], label=labels[class_ids[0]], probability=probabilities[0]))
        answers.append(FrameResult(filename=upload.filename, width=width, height=height, signs=named))
    return DetectResponse(model=detector.loaded.name, classifier=classifier.loaded.name, results=answers)
