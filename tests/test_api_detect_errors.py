"""Every answer of /v1/detect but 200, each with its cause named, on the real app in process (the shipped
detector and cnn): a request whose boxes outnumber the classifier's whole queue is answered, not a 500;
bad bodies and files get their 4xx; a detector that is not served is a 404; the deadline is a 504."""

from __future__ import annotations

import shutil
import time

import pytest

from conftest import app_client
from helpers import encode, files, png_declaring
from models.detector import box_iou
from models.paths import default_data_root
from models.gtsdb import read_ground_truth, split_frames

QUEUE = 8


@pytest.fixture(scope="module")
def frames():
    """Ten validation frames that hold signs: (name, JPEG bytes, true signs)."""
    root = default_data_root()
    picked = [f for f in split_frames(read_ground_truth(root), "val") if f.signs][:10]
    return [(f.name, open(f"{root}/gtsdb/images/{f.name}", "rb").read(), f.signs) for f in picked]


@pytest.fixture(scope="module")
def detector_and_cnn(checkpoint_snapshot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("detector-cnn")
    for name in ("detector.pt", "cnn.pt"):
        shutil.copy2(checkpoint_snapshot / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def client(detector_and_cnn):
    with app_client(detector_and_cnn, queue_size=QUEUE, max_files_per_request=12,
                    max_request_pixels=11 * 1360 * 800) as client:
        yield client


def expect(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = str(response.json()["detail"]).lower()
    for word in words:
        assert word.lower() in detail, (word, detail)


def test_more_boxes_than_the_queue_holds_are_named_in_chunks(client, frames):
    # ten frames are more than the queue's 8, and at min_score 0.05 each frame has dozens of candidate
    # boxes to name: both used to fail with "500 internal error: TooManyImages"
    response = client.post("/v1/detect", files=files(*[(n, d) for n, d, _ in frames]), params={"min_score": 0.05})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [n for n, _, _ in frames]
    found = total = 0
    for result, (_, _, signs) in zip(results, frames):
        for truth in signs:
            total += 1
            found += any(box_iou(tuple(s["box"]), truth.box) >= 0.5 and s["class_id"] == truth.class_id
                         for s in result["signs"])
    assert found / total >= 0.6, (found, total)


def test_malformed_bodies_and_files(client, frames):
    name, data, _ = frames[0]
    expect(client.post("/v1/detect", content=b"{}", headers={"Content-Type": "application/json"}),
           415, "multipart")
    expect(client.post("/v1/detect", content=b"--x\r\nbroken", headers={"Content-Type":
                                                                          "multipart/form-data; boundary=x"}),
           400)
    expect(client.post("/v1/detect", files=files((name, data), field="image")), 422, "file")
    expect(client.post("/v1/detect", files=files(("empty.jpg", b""))), 422, "empty.jpg", "empty")
    expect(client.post("/v1/detect", files=files(("notes.txt", b"no pixels here"))), 422, "notes.txt")


def test_an_unknown_classifier_is_a_404_listing_only_those_that_name_boxes(client, frames):
    name, data, _ = frames[0]
    response = client.post("/v1/detect", files=files((name, data)), params={"classifier": "vgg99"})
    expect(response, 404, "vgg99", "available: cnn")
    assert "detector" not in response.json()["detail"]
    expect(client.post("/v1/detect", files=files((name, data)), params={"classifier": "detector"}), 422,
           "cannot name boxes", "cnn")


def test_size_count_and_pixel_limits_are_413s(client, frames):
    name, data, _ = frames[0]
    expect(client.post("/v1/detect", files=files(*[(f"{i}.jpg", data) for i in range(13)])), 413, "12")
    expect(client.post("/v1/detect", files=files(("bomb.png", png_declaring(60_000, 60_000)))), 413, "bomb.png")
    # 12 frames fit the file count but not the request's pixel budget of 11 frames
    expect(client.post("/v1/detect", files=files(*[(f"{i}.jpg", data) for i in range(12)])), 413, "pixels")


def test_a_file_over_the_upload_size_is_a_413(detector_and_cnn, frames):
    name, data, _ = frames[0]
    with app_client(detector_and_cnn, max_upload_bytes=len(data) - 1) as small:
        expect(small.post("/v1/detect", files=files((name, data))), 413, name)


def test_no_detector_served_is_a_404(cnn_snapshot, frames):
    name, data, _ = frames[0]
    with app_client(cnn_snapshot) as only_classifier:
        expect(only_classifier.post("/v1/detect", files=files((name, data))), 404, "no detector")


def test_the_deadline_is_a_504_named_in_the_openapi(detector_and_cnn, frames):
    name, data, _ = frames[0]
    with app_client(detector_and_cnn, request_timeout_s=0.001) as hurried:
        expect(hurried.post("/v1/detect", files=files((name, data))), 504, "SIGNSERVE_REQUEST_TIMEOUT_S")
        answers = hurried.get("/openapi.json").json()["paths"]["/v1/detect"]["post"]["responses"]
        assert {"400", "404", "413", "415", "422", "503", "504"} <= set(answers)


def test_an_image_that_decodes_is_answered_even_when_tiny(client):
    # not an error: a 1x1 photo has no sign in it
    from PIL import Image
    response = client.post("/v1/detect", files=files(("dot.png", encode(Image.new("RGB", (1, 1)), "PNG"))))
    assert response.status_code == 200 and response.json()["results"][0]["signs"] == []


def test_no_model_loaded_is_a_503_naming_why(tmp_path, frames):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    (tmp_path / "detector.pt").write_bytes(b"not a checkpoint")
    name, data, _ = frames[0]
    settings = Settings(checkpoint_dir=tmp_path, worker_processes=False, warmup=False, backend="torch")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while "no model could be loaded" not in client.get("/readyz").text:  # the load has failed
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        expect(client.post("/v1/detect", files=files((name, data))), 503, "no model could be loaded", "detector.pt")
