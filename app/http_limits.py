"""Limits on what one HTTP request may cost: body size, time to send the body, size of error answers.

`RequestLimitsMiddleware` holds every request body to `max_body_bytes` (413 as soon as the declared
Content-Length or the bytes received pass it) and to a deadline of `body_timeout_s` from the first
byte of the body (408): a client sending a byte a second cannot hold a connection and a task
forever. Routes that stream uploads and enforce their own, larger limits (app.uploads) lift the
body limit for their request with `allow_body_bytes`. The time to send the headers is bounded one
level below, in the HTTP protocol (app.server).

`validation_error_handler` answers 422 like FastAPI does, but each error's `input` is a short
excerpt: the default echoes the whole input back (a 50 MB string gave a 52 MB answer), and a NaN or
an infinite number in it made the answer itself fail to serialise (500).
"""

from __future__ import annotations

import asyncio
import math
import reprlib
import time

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_LIMIT_KEY = "signserve.max_body_bytes"
EXCERPT_CHARS = 80

_excerpt = reprlib.Repr()
_excerpt.maxlevel, _excerpt.maxdict, _excerpt.maxlist, _excerpt.maxtuple, _excerpt.maxset = 2, 4, 4, 4, 4
_excerpt.maxstring = _excerpt.maxother = EXCERPT_CHARS
_excerpt.maxlong = 40


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, received: int | None = None) -> None:
        what = f"of {received:,} bytes " if received is not None else ""
        super().__init__(413, f"request body {what}is larger than the limit of {limit:,} bytes for this route")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body was not received within {seconds:g} s",
                         headers={"Connection": "close"})


def allow_body_bytes(request: Request, limit: int | None) -> None:
    """Let this request's body be up to `limit` bytes (None: the route counts them itself)."""
    request.scope[BODY_LIMIT_KEY] = limit


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[BODY_LIMIT_KEY] = self.max_body_bytes
        received = 0
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, deadline
            limit = scope.get(BODY_LIMIT_KEY)
            if received == 0 and limit is not None:
                declared = _declared_length(scope)
                if declared is not None and declared > limit:
                    raise BodyTooLarge(limit, declared)
            if deadline is None:
                deadline = time.monotonic() + self.body_timeout_s
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if limit is not None and received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def excerpt(value: object) -> str:
    """A short, JSON-safe description of any input: at most ~EXCERPT_CHARS characters of it."""
    if isinstance(value, str):
        if len(value) <= EXCERPT_CHARS:
            return value
        return f"{value[:EXCERPT_CHARS]}... ({len(value):,} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = _excerpt.repr(value)
    except ValueError:  # an integer too long to print
        return f"a {type(value).__name__}"
    return text if len(text) <= 2 * EXCERPT_CHARS else text[:2 * EXCERPT_CHARS] + "..."


def _short(item: object) -> object:
    if isinstance(item, str) and len(item) > EXCERPT_CHARS:
        return excerpt(item)
    return item


def _json_safe(value: object) -> object:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and abs(value) < 2 ** 63:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return excerpt(value)


def short_errors(errors: list[dict]) -> list[dict]:
    """FastAPI's validation errors with every echoed value cut to an excerpt."""
    out = []
    for error in errors:
        item = {"type": error.get("type"), "loc": [_short(part) for part in error.get("loc", ())],
                "msg": _short(error.get("msg", ""))}
        if "input" in error:
            item["input"] = excerpt(error["input"])
        if error.get("ctx"):
            item["ctx"] = {str(k): _json_safe(v) for k, v in error["ctx"].items()}
        out.append(item)
    return out


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": short_errors(list(exc.errors()))}, status_code=422)
