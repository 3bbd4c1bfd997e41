"""A runtime's exported model file is served only while it is the very file that passed parity: a
file changed on disk (tampered, truncated), or a cached record pointing outside its cache folder, is
never loaded; the forward falls back to torch fp32, says so, and /v1/models shows what really runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time

import pytest
import torch
from torch import nn

from conftest import start_server
from helpers import files, forward_workers
from models.backends import BackendRecord, Job, build_forward, installed, load_forward, output_parity, select
from models.export import InputSpec

pytestmark = pytest.mark.skipif(installed("onnxruntime") is None, reason="onnxruntime not installed")


def small_job(cache_dir) -> tuple[nn.Module, Job]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    job = Job("ab" * 32, InputSpec((4, 3, 16, 16)), batches, batches[0], cache_dir, parity=output_parity,
              measure_seconds=0.1, name="small")
    return module, job


def test_a_changed_file_is_refused_and_the_forward_falls_back(tmp_path, caplog):
    module, job = small_job(tmp_path / "cache")
    _, record = select(module, job, request="onnxruntime-fp32")
    assert record.label == "onnxruntime-fp32" and len(record.artifact_sha256) == 64
    build_forward(record, module, torch.device("cpu"), 1)  # the file as chosen loads
    with open(record.artifact, "ab") as f:
        f.write(b"\0")  # one byte more: not the file that passed parity
    with pytest.raises(ValueError, match="not the file chosen"):
        build_forward(record, module, torch.device("cpu"), 1)
    with caplog.at_level(logging.WARNING, logger="signserve"):
        forward, label = load_forward(record, module, torch.device("cpu"), 1, name="small")
    assert label == "torch-fp32" and "not the file chosen" in caplog.text
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(forward(x), module(x))
    # the cached choice is not trusted either: it is made again, from a fresh export
    with caplog.at_level(logging.WARNING, logger="signserve"):
        _, again = select(module, job, request="onnxruntime-fp32")
    assert not again.cached and "choosing again" in caplog.text and again.label == "onnxruntime-fp32"


def test_a_record_pointing_outside_its_cache_is_not_followed(tmp_path, caplog):
    module, job = small_job(tmp_path / "cache")
    _, record = select(module, job, request="onnxruntime-fp32")
    [path] = (tmp_path / "cache").glob("*/choice-*.json")
    saved = json.loads(path.read_text())
    assert not os.path.isabs(saved["artifact"])  # stored relative to the record
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(record.artifact, outside)
    saved["artifact"] = str(outside)  # same bytes, same digest, but not the cache's file
    path.write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="signserve"):
        _, again = select(module, job, request="onnxruntime-fp32")
    assert not again.cached and "outside the cache folder" in caplog.text


def test_a_copied_cache_serves_its_own_files(tmp_path):
    module, job = small_job(tmp_path / "cache")
    _, first = select(module, job, request="onnxruntime-fp32")
    shutil.copytree(tmp_path / "cache", tmp_path / "copy")
    shutil.rmtree(tmp_path / "cache")
    job.cache_dir = tmp_path / "copy"
    _, second = select(module, job, request="onnxruntime-fp32")
    assert second.cached and second.artifact.startswith(str(tmp_path / "copy"))
    assert second.artifact_sha256 == first.artifact_sha256


@pytest.mark.slow
def test_a_worker_restarted_after_its_file_changed_runs_torch_and_says_so(cnn_snapshot, tmp_path, sign_png):
    """The attack: the cached ONNX file is replaced while the service runs, then a forward worker is
    replaced (a crash, the OOM killer, the watchdog). The new worker must not load the file."""
    server = start_server(cnn_snapshot, tmp_path / "server.log", backend="onnxruntime-fp32",
                          backend_cache_dir=tmp_path / "cache", backend_parity_images=64, device="cpu",
                          worker_processes="true", instances=2, warmup="false")
    try:
        with server.client() as client:
            backend = client.get("/v1/models/cnn").json()["backend"]
            assert backend["running"] == ["onnxruntime-fp32"] * 2, backend
            with open(backend["artifact"], "ab") as f:
                f.write(b"\0")
            workers = forward_workers(server)
            os.kill(workers[0], signal.SIGKILL)
            deadline = time.monotonic() + 300
            while True:  # until the replacement has loaded and the pool is whole again
                assert client.post("/v1/predict", files=files(("a.png", sign_png))).status_code in (200, 503)
                backend = client.get("/v1/models/cnn").json()["backend"]
                if sorted(backend["running"]) == ["onnxruntime-fp32", "torch-fp32"]:
                    break
                assert time.monotonic() < deadline, backend
                time.sleep(0.2)
            assert workers[0] not in forward_workers(server)
            assert client.post("/v1/predict", files=files(("a.png", sign_png))).status_code == 200
        assert "not the file chosen" in server.log()
    finally:
        server.stop()
