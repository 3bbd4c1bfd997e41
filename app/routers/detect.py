"""POST /v1/detect: street photos -> every sign in them, boxed and named."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, HTTPException, Request

from app.decoding import decode_uploads
from app.dependencies import get_served_model, require_ready
from app.kinds import ServedModel
from app.routers.requests import multipart_openapi, parse_query, read_uploads, submit_in_chunks
from app.schemas.detect import DetectQuery, DetectResponse, FrameResult, Sign
from app.schemas.health import ErrorResponse
from app.service import Service
from models.scene import default_namer, name_signs, scene_rule, score_threshold

router = APIRouter(prefix="/v1", tags=["detect"])


def get_detector(service: Service) -> ServedModel:
    detectors = [m for m in service.models.values() if m.kind.finds_boxes]
    if not detectors:
        raise HTTPException(404, "no detector is served (train one with `make train MODEL=detector` and put "
                                 "detector.pt in the checkpoint directory)")
    return detectors[0]


def names_boxes(served: ServedModel) -> bool:
    return served.kind.names_boxes


@router.post(
    "/detect",
    response_model=DetectResponse,
    summary="Find and name every traffic sign in street photos",
    openapi_extra=multipart_openapi(DetectQuery),
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
    photo (models.scene, the one pipeline); boxes are in the uploaded image's pixels, best first."""
    query = parse_query(request, DetectQuery)
    service = require_ready(request.app.state.service)
    detector = get_detector(service)
    namers = {n: m.test_accuracy for n, m in service.models.items() if names_boxes(m)}
    if query.classifier in service.models and query.classifier not in namers:
        raise HTTPException(422, f"{query.classifier!r} cannot name boxes; classifier= takes one of "
                                 f"{', '.join(namers)}")
    classifier = get_served_model(service, query.classifier or default_namer(detector.loaded, namers), names_boxes,
                                  role="box-naming model")
    settings = service.settings
    with detector.batcher.expecting():
        uploads = await read_uploads(request, settings)
        # upright RGB, reduced while decoded to the detector's input (its longest side)
        scenes = await decode_uploads(uploads, detector.kind.decoder(detector.loaded), service.decode_budget,
                                      settings.max_image_pixels)
    # no longer announced once its frames are ready: a batch must not wait for more of them
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s

    async def find(frames: list) -> list:
        return await submit_in_chunks(detector, frames, service, deadline)

    async def name(crops: list) -> list:
        return await submit_in_chunks(classifier, crops, service, deadline)

    found = await name_signs(scenes, find, name, detector_pre=detector.loaded.preprocessing,
                             classifier_pre=classifier.loaded.preprocessing,
                             rule=scene_rule(classifier.rule, detector.loaded),
                             min_score=query.min_score if query.min_score is not None else
                             score_threshold(detector.loaded))
    service.metrics.prediction_duration.labels(detector.name).observe(time.perf_counter() - started)
    labels = classifier.class_names
    return DetectResponse(model=detector.name, classifier=classifier.name, results=[
        FrameResult(filename=upload.filename, width=scene.original_size[0], height=scene.original_size[1],
                    signs=[Sign.of(s, labels) for s in signs])
        for upload, scene, signs in zip(uploads, scenes, found)])
