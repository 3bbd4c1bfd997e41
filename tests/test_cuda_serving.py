"""The service on a GPU: fp16 + channels_last, CUDA memory in /metrics, same answers as the CPU.
Skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from conftest import start_server
from helpers import files, samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_server(checkpoint_snapshot, tmp_path_factory):
    live = start_server(checkpoint_snapshot, tmp_path_factory.mktemp("cuda") / "server.log", device="cuda")
    yield live
    live.stop()


def test_models_run_on_cuda(cuda_server):
    with cuda_server.client() as client:
        models = client.get("/v1/models").json()["models"]
        assert models and all(m["device"].startswith("cuda") for m in models)
        metrics = samples(client.get("/metrics").text)
        assert any(name == "signserve_cuda_memory_allocated_bytes" and value > 0
                   for (name, _), value in metrics.items())


def test_cuda_and_cpu_agree(cuda_server, client, gtsrb_test_samples):
    from PIL import Image

    from helpers import encode

    items = []
    for path, _ in gtsrb_test_samples[:32]:
        with Image.open(path) as image:
            items.append((path.rsplit("/", 1)[-1] + ".png", encode(image.convert("RGB"), "PNG")))
    cpu = client.post("/v1/predict", params={"model": "cnn"}, files=files(*items)).json()["results"]
    with cuda_server.client() as gpu_client:
        gpu = gpu_client.post("/v1/predict", params={"model": "cnn"}, files=files(*items)).json()["results"]
    agree = sum(a["predictions"][0]["class_id"] == b["predictions"][0]["class_id"] for a, b in zip(cpu, gpu))
    assert agree >= len(items) - 1  # fp16 may flip a near-tie
    for a, b in zip(cpu, gpu):
        assert abs(a["predictions"][0]["probability"] - b["predictions"][0]["probability"]) < 0.02
