"""What the upload routes share: the multipart body and query they read, and waiting for the batchers."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.batching import QueueFull
from app.settings import Settings
from app.uploads import FILE_FIELD, Upload, read_request_files
from app.workers import WorkerDied, WorkerHung

Q = TypeVar("Q", bound=BaseModel)


# The body is read in the route (to enforce limits while it streams), so FastAPI cannot
# derive its schema from a parameter: this is what `list[UploadFile] = File(...)` would document.
# The query is validated in the route too (see `parse_query`), so its parameters are documented here.
def query_parameters(query: type[BaseModel]) -> list[dict]:
    """OpenAPI query parameters for a route that validates its query with `query` itself."""
    return [{"name": name, "in": "query", "required": False, "description": schema.get("description"),
             "schema": {k: v for k, v in schema.items() if k != "description"}}
            for name, schema in query.model_json_schema()["properties"].items()]


def multipart_openapi(query: type[BaseModel]) -> dict:
    """The OpenAPI of a route that takes images in the multipart field `file` and its query `query`."""
    return {
        "parameters": query_parameters(query),
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


def parse_query(request: Request, query: type[Q]) -> Q:
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


async def submit_in_chunks(served, images: list, service, deadline: float) -> list:
    """Queue items on a model's batcher and wait for their results, in chunks of a quarter of its queue:
    the boxes of many frames can outnumber the whole queue (thousands at a low min_score), and a
    request that waits for each chunk in turn leaves room for other clients' images. 503 when even a
    chunk does not fit now; the deadline (504), hung-worker (504) and dead-worker (503) answers of
    `await_results`, the deadline counted once for the whole request."""
    chunk = max(1, served.batcher.queue_size // 4)
    results: list = []
    for start in range(0, len(images), chunk):
        try:
            futures = served.batcher.submit(images[start:start + chunk])
        except QueueFull as exc:
            service.metrics.queue_rejections.labels(served.name).inc()
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        results += await await_results(futures, service.settings.request_timeout_s, deadline=deadline)
    return results
