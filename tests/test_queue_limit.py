"""More images in one request than the queue can ever hold is a 413 naming the limit, not a 503 whose
retry can never succeed."""

from __future__ import annotations

from conftest import app_client
from helpers import files


def test_a_request_larger_than_the_queue_is_a_413_naming_the_limit(cnn_snapshot, sign_png):
    with app_client(cnn_snapshot, queue_size=4) as client:
        response = client.post("/v1/predict", files=files(*[(f"{i}.png", sign_png) for i in range(5)]))
        assert response.status_code == 413, response.text
        detail = response.json()["detail"]
        assert "5 images" in detail and "at most 4" in detail and "SIGNSERVE_QUEUE_SIZE" in detail
        assert "Retry-After" not in response.headers
        fits = client.post("/v1/predict", files=files(*[(f"{i}.png", sign_png) for i in range(4)]))
        assert fits.status_code == 200 and len(fits.json()["results"]) == 4
