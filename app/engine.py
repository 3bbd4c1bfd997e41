"""The device a service runs on, and the runtime each model's forward runs on."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.kinds import kind_of
from models.backends import BackendRecord, select
from models.checkpoint import LoadedModel

log = logging.getLogger("signserve")


def select_device(setting: str) -> torch.device:
    """`auto` -> cuda when a GPU is usable, else cpu; an explicit cuda that is missing is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SIGNSERVE_DEVICE={setting} but torch sees no CUDA device")
    return device


def torch_record(loaded: LoadedModel, threads: int, half: bool, reason: str = "") -> BackendRecord:
    """Plain torch: fp16 on CUDA when `half`, else fp32."""
    precision = "fp16" if half and loaded.device.type == "cuda" else "fp32"
    return BackendRecord("torch", precision, reason=reason, threads=threads)


def choose_backend(loaded: LoadedModel, request: str, *, cache_dir: Path, batch_size: int, parity_images: int,
                   threads: int, half: bool = True) -> BackendRecord:
    """The backend record a model is served with (models.backends.select on its kind's selection job;
    cached per checkpoint, machine and thread count). `torch` skips the export, parity and timing."""
    if request == "torch" or loaded.device.type == "cuda":
        reason = "SIGNSERVE_BACKEND=torch" if request == "torch" else \
            "CUDA: torch (the CPU runtimes do not apply; TensorRT is not wired in)"
        return torch_record(loaded, threads, half, reason)
    try:
        selection = kind_of(loaded).selection(loaded, cache_dir, batch_size, parity_images)
        return select(selection.module, selection.job, request=request, device=loaded.device, threads=threads,
                      half=half)[1]
    except Exception as exc:  # choosing must never keep a model from being served
        reason = f"choosing a backend failed ({type(exc).__name__}: {exc}): torch fp32"
        log.error("%s: %s", loaded.name, reason)
        return BackendRecord("torch", "fp32", reason=reason, threads=threads)
