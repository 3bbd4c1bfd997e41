"""GET /v1/models..., the training metrics and plot, probes and the OpenAPI page (the app in this process)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from models.checkpoint import file_sha256, metrics_csv, safe_load, served_checkpoints

MODEL_FIELDS = {"name", "kind", "architecture", "parameters", "input_size", "test_accuracy", "validation",
                "score_threshold", "min_probability", "epochs", "start_weights", "checkpoint_sha256", "device", "backend",
                "members", "calibration"}


@pytest.fixture
def client(inprocess):
    return inprocess


def checkpoint(checkpoint_dir, name: str) -> dict:
    return safe_load(checkpoint_dir / f"{name}.pt")


def test_models_list_describes_every_checkpoint(checkpoint_snapshot, client):
    body = client.get("/v1/models").json()
    names = [m["name"] for m in body["models"] if not m["members"]]  # the ensemble has no checkpoint of its own
    served = [p.stem for p in served_checkpoints(checkpoint_snapshot)]
    assert sorted(names) == served
    for info in body["models"]:
        assert set(info) == MODEL_FIELDS
        if info["members"]:
            continue
        ckpt = checkpoint(checkpoint_snapshot, info["name"])
        if "calibration" in ckpt:
            assert info["calibration"]["temperature"] == ckpt["calibration"]["temperature"]
            assert info["calibration"]["test_ece"] == ckpt["calibration"]["report"]["after"]["test"]["ece"]
        assert info["architecture"] == ckpt["architecture"]
        assert info["input_size"] == ckpt["preprocessing"]["input_size"]
        assert info["epochs"] == len(ckpt["metrics"])
        assert info["test_accuracy"] == ckpt["metrics"][-1].get("test_accuracy")
        assert info["kind"] == ("detector" if ckpt["architecture"] == "detector" else "classifier")
        if info["kind"] == "detector":
            assert info["validation"]["val_map50"] == ckpt["metrics"][-1]["val_map50"]
            assert info["score_threshold"] == ckpt["inference"]["score_threshold"]
            assert info["min_probability"] == ckpt["inference"]["min_probability"]
        assert info["start_weights"] == ckpt["start_weights"]
        assert info["checkpoint_sha256"] == file_sha256(checkpoint_snapshot / f"{info['name']}.pt")
        assert info["parameters"] > 100_000
        assert info["device"] in ("cpu", "cuda", "cuda:0")
        # the suite's server runs torch (tests/conftest.py); other backends: tests/test_backends.py
        assert info["backend"]["backend"] == "torch"
    best = max((m for m in body["models"] if m["kind"] == "classifier" and not m["members"]),
               key=lambda m: m["test_accuracy"])
    assert body["default"] in (best["name"], "ensemble")  # tests/test_recognition.py checks which


def test_one_model(client, model_names):
    for name in model_names:
        assert client.get(f"/v1/models/{name}").json()["name"] == name


def test_unknown_model_is_404_everywhere(client):
    for suffix in ("", "/metrics", "/metrics.csv", "/metrics.png"):
        response = client.get(f"/v1/models/vgg99{suffix}")
        assert response.status_code == 404, suffix
        assert "vgg99" in response.json()["detail"]


def test_metrics_json_and_csv_match_the_checkpoint(checkpoint_snapshot, client, model_names):
    for name in model_names:
        recorded = checkpoint(checkpoint_snapshot, name)["metrics"]
        epochs = client.get(f"/v1/models/{name}/metrics").json()["epochs"]
        assert len(epochs) == len(recorded) >= 1
        for got, want in zip(epochs, recorded):
            assert set(got) == set(want)
            for key in want:
                assert got[key] == want[key]
        response = client.get(f"/v1/models/{name}/metrics.csv")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert response.text == metrics_csv(recorded)


def test_metrics_plot_is_a_png(client, model_names):
    for name in model_names:
        response = client.get(f"/v1/models/{name}/metrics.png")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG" and image.width >= 600 and image.height >= 250
        # not blank: the curves and labels put many colours on the canvas
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50


def test_probes(client, model_names):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    served = [m["name"] for m in client.get("/v1/models").json()["models"]]  # the ensemble too
    assert ready["status"] == "ready" and sorted(ready["models"]) == sorted(served)
    assert set(model_names) <= set(served)


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/predict", "/v1/models", "/v1/models/{name}", "/v1/models/{name}/metrics",
                 "/v1/models/{name}/metrics.csv", "/v1/models/{name}/metrics.png", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    predict = paths["/v1/predict"]["post"]
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"]["type"] == "array" and body["required"] == ["file"]
    assert {p["name"] for p in predict["parameters"]} == {"model", "top_k"}
    assert {"200", "404", "413", "422", "503"} <= set(predict["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_upload_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<div id="calculators"></div>' in page.text
    assert '<script src="/static/calculators.js"></script>' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200, asset
