"""The HTTP ceiling: FastAPI endpoints that only receive the upload and answer a small JSON.

    uvicorn bench.receive_only:app
"""

from __future__ import annotations

from fastapi import FastAPI, File, Request, UploadFile

app = FastAPI()


@app.post("/v1/predict")
async def receive(file: UploadFile = File(...)) -> dict:
    """What a minimal FastAPI upload endpoint costs: Starlette's multipart parser + UploadFile."""
    data = await file.read()
    return {"filename": file.filename, "bytes": len(data)}


@app.post("/raw")
async def raw(request: Request) -> dict:
    """Below that: read the body, no multipart parsing at all."""
    return {"bytes": len(await request.body())}


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
