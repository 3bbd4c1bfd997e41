"""GET /metrics: the Prometheus exposition reflects the traffic the app has seen (the app in this process)."""

from __future__ import annotations

import pytest

from helpers import files, samples, value


@pytest.fixture
def client(inprocess):
    return inprocess


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def test_counters_follow_traffic(client, sign_png):
    before = scrape(client)
    for _ in range(3):
        assert client.post("/v1/predict", params={"model": "cnn"},
                           files=files(("a.png", sign_png), ("b.png", sign_png))).status_code == 200
    assert client.post("/v1/predict", params={"top_k": 0}, files=files(("a.png", sign_png))).status_code == 422
    assert client.post("/v1/predict", files=files(("e.png", b""))).status_code == 422
    assert client.get("/v1/models/cnn").status_code == 200
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"method": "POST", "route": "/v1/predict", "status": "200"}
    assert delta("signserve_http_requests_total", **ok) == 3
    assert delta("signserve_http_request_duration_seconds_count", **ok) == 3
    assert delta("signserve_http_request_duration_seconds_bucket", le="+Inf", **ok) == 3
    assert delta("signserve_http_requests_total", method="POST", route="/v1/predict", status="422") == 2
    # templates, not raw paths, so label values stay few
    assert delta("signserve_http_requests_total", method="GET", route="/v1/models/{name}", status="200") == 1
    assert delta("signserve_images_classified_total", model="cnn") == 6
    assert delta("signserve_prediction_duration_seconds_count", model="cnn") == 3
    assert delta("signserve_batch_size_sum", model="cnn") == 6
    # one forward per request, or two when the batcher splits a request's images over two idle instances
    assert 1 <= delta("signserve_batch_size_count", model="cnn") <= 6
    assert delta("signserve_forward_duration_seconds_count", model="cnn") == delta("signserve_batch_size_count",
                                                                                   model="cnn")


def test_gauges_and_model_info(client, model_names):
    metrics = scrape(client)
    for name in model_names:
        assert value(metrics, "signserve_model_load_seconds", model=name) > 0
        assert ("signserve_queue_depth", (("model", name),)) in metrics
        assert any(n == "signserve_model_info" and dict(labels)["model"] == name for n, labels in metrics)
    on_cuda = any(dict(labels).get("device", "").startswith("cuda") for n, labels in metrics
                  if n == "signserve_model_info")
    assert any(n == "signserve_cuda_memory_allocated_bytes" for n, _ in metrics) == on_cuda


def test_unmatched_paths_share_one_label(client):
    before = scrape(client)
    for i in range(3):
        client.get(f"/no/such/path/{i}")
    after = scrape(client)
    labels = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(after, "signserve_http_requests_total", **labels) - \
        value(before, "signserve_http_requests_total", **labels) == 3
    assert not any("/no/such" in dict(l).get("route", "") for _, l in after)
