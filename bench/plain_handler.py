"""The baseline a user would write by hand: one request, one image, one forward pass, no batching.

    BENCH_CHECKPOINT=models/checkpoints/cnn.pt uvicorn bench.plain_handler:create_app --factory

A plain `def` route, so FastAPI runs it in its thread pool (the documented way to call blocking
code); same preprocessing and model as the service.
"""

from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from models.checkpoint import load_checkpoint
from models.preprocessing import image_to_uint8, normalize


def create_app() -> FastAPI:
    loaded = load_checkpoint(os.environ["BENCH_CHECKPOINT"], device="cuda" if torch.cuda.is_available() else "cpu")
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(file: UploadFile = File(...), top_k: int = 5) -> dict:
        image = Image.open(io.BytesIO(file.file.read()))
        x = normalize(image_to_uint8(image, loaded.preprocessing)[None].to(loaded.device), loaded.preprocessing)
        with torch.inference_mode():
            probabilities = loaded.model(x).softmax(1)[0].cpu()
        values, ids = probabilities.topk(top_k)
        return {"model": loaded.name, "results": [{"filename": file.filename, "predictions": [
            {"class_id": c, "label": loaded.class_names[c], "probability": p}
            for c, p in zip(ids.tolist(), values.tolist())]}]}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app
