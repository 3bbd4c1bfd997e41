"""Service settings from the environment, the CPU execution plan, and start-up failures that must be loud."""

from __future__ import annotations

import os

import pytest
import torch
from pydantic import ValidationError

from app.service import ExecutionPlan, execution_plan
from app.settings import Settings, available_cores
from conftest import start_server


def test_defaults(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SIGNSERVE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.device) == ("127.0.0.1", 8000, "auto")
    assert s.checkpoint_dir.parts[-2:] == ("models", "checkpoints")
    assert s.max_files_per_request == 64 and s.max_upload_bytes == 10 * 1024 * 1024


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("SIGNSERVE_PORT", "9123")
    monkeypatch.setenv("SIGNSERVE_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("SIGNSERVE_DEVICE", "CUDA:1")
    monkeypatch.setenv("SIGNSERVE_MAX_WAIT_MS", "0.5")
    s = Settings()
    assert s.port == 9123 and s.checkpoint_dir == tmp_path and s.device == "cuda:1" and s.max_wait_ms == 0.5


@pytest.mark.parametrize("key,value", [("SIGNSERVE_DEVICE", "tpu"), ("SIGNSERVE_PORT", "70000"),
                                       ("SIGNSERVE_MAX_BATCH_SIZE", "0"), ("SIGNSERVE_QUEUE_SIZE", "-1"),
                                       ("SIGNSERVE_BACKEND", "tensorrt"), ("SIGNSERVE_BACKEND", "openvino-fp16")])
def test_invalid_settings_are_refused(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_cpu_plan_splits_the_cores_between_worker_processes():
    cores = available_cores()
    plan = execution_plan(Settings(), torch.device("cpu"))
    # every core busy, none oversubscribed: instances x threads fills the machine (one thread each at least)
    assert 1 <= plan.instances <= cores and plan.torch_threads >= 1
    assert cores - plan.instances < plan.instances * plan.torch_threads <= cores
    assert plan.processes
    assert execution_plan(Settings(instances=1, torch_threads=3, worker_processes=False), torch.device("cpu")) == \
        ExecutionPlan(1, 3, False)
    assert execution_plan(Settings(), torch.device("cuda")) == ExecutionPlan(1, None, False)


def test_no_checkpoints_fails_start_up_loudly(tmp_path):
    with pytest.raises(RuntimeError, match=r"no \*\.pt checkpoints"):
        start_server(tmp_path, tmp_path / "server.log")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_a_gpu_fails_start_up_loudly(checkpoint_snapshot, tmp_path):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        start_server(checkpoint_snapshot, tmp_path / "server.log", device="cuda")


def test_a_detector_leaves_one_forward_instance_to_the_classifiers(checkpoint_snapshot):
    """Street frames take a second or more per forward: with every instance on them, classifier batches
    of a few milliseconds would wait behind frames (bench.sharing measures it)."""
    from app.kinds import kind_of
    from models.checkpoint import load_checkpoint

    detector = load_checkpoint(checkpoint_snapshot / "detector.pt")
    cnn = load_checkpoint(checkpoint_snapshot / "cnn.pt")
    batching = kind_of(detector).batching
    assert batching(detector, 64, instances=2).instances == 1
    assert batching(detector, 64, instances=4).instances == 3
    assert batching(detector, 64, instances=1).instances == 1  # nothing to leave on one instance
    assert kind_of(cnn).batching(cnn, 64, instances=2).instances == 2
