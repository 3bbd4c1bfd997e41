"""Security headers on every answer, and the API documentation page served from installed files.

The page at /docs is Swagger UI from the `fastapi-offline` package's files (FastAPI's default page
loads its scripts from a CDN and is blank without internet; Swagger UI 5 is needed for OpenAPI 3.1),
started by a script of ours instead of an inline one, so the Content-Security-Policy can allow
scripts from this origin only.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SWAGGER_UI_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                           "frame-ancestors 'none'; base-uri 'self'; form-action 'self'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeadersMiddleware:
    """Adds SECURITY_HEADERS to every HTTP answer (unless the route set its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()),
                                      *(h for h in SECURITY_HEADERS if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_offline_docs(app: FastAPI, static_dir: Path) -> None:
    """/docs: Swagger UI for /openapi.json, every file served by this process."""
    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(static_dir / "docs.html")
