"""Service settings, read from the environment (prefix SIGNSERVE_, e.g. SIGNSERVE_PORT=9000)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.imaging import DEFAULT_MAX_IMAGE_PIXELS
from models.paths import DEFAULT_CHECKPOINT_DIR, PROJECT_ROOT

MB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIGNSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 exposes the service")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    access_log: bool = Field(False, description="uvicorn's per-request log line (costs throughput)")

    checkpoint_dir: Path = Field(DEFAULT_CHECKPOINT_DIR,
                                 description="every *.pt in it is served, named by its file stem")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    half: bool = Field(True, description="fp16 weights and inputs on CUDA (ignored on the CPU)")
    channels_last: bool = Field(True, description="NHWC memory format (faster convolutions on CPU and CUDA)")
    instances: int | None = Field(None, ge=1, description="forward passes that may run at once per model "
                                                         "(default: 1 on CUDA, min(2, cores) on the CPU)")
    worker_processes: bool | None = Field(None, description="run forward passes in worker processes, away "
                                                            "from the event loop's GIL (default: on the CPU)")
    worker_nice: int = Field(10, ge=0, le=19, description="CPU niceness added to the forward worker processes, "
                                                          "so the event loop that feeds them runs first")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default on the CPU: "
                                                              "cores / instances; on CUDA: torch's own)")
    backend: str = Field(
        "auto", description="the forward's runtime: auto (the fastest that matches torch fp32 on real images, "
                            "chosen once per checkpoint and machine, see docs/backends.md), a runtime (torch, "
                            "onnxruntime, openvino: its fastest variant that passes parity), or one variant "
                            "exactly (e.g. openvino-fp32, openvino-bf16, onnxruntime-int8)")
    backend_cache_dir: Path = Field(PROJECT_ROOT / ".cache" / "backends",
                                    description="exported models and backend choices, by checkpoint sha256")
    backend_parity_images: int = Field(500, ge=1, description="real GTSRB test images every backend must "
                                                              "classify as torch fp32 does")
    warmup: bool = Field(True, description="run a forward pass at every batch size class before /readyz")

    max_batch_size: int = Field(64, ge=1, description="images per forward pass, at most")
    # 6 rather than 2: at c=32 the gaps between a returning burst's requests exceeded 2 ms often
    # enough to split it (ResNet18 80x80: 10.8-12.1 images per forward at 2 ms, 15.7 at 6 ms).
    max_wait_ms: float = Field(6.0, ge=0, description="how long a batch waits for more images once the "
                                                      "model is free (while another forward runs: the "
                                                      "longest gap between arrivals it waits out)")
    queue_size: int = Field(1024, ge=1, description="images waiting per model; beyond it 503 + Retry-After")

    max_files_per_request: int = Field(64, ge=1)
    max_upload_bytes: int = Field(10 * MB, ge=1, description="per file, enforced while the body streams in")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="declared width x height beyond "
                                  "which an image is refused before decoding (a 48 Mpx phone photo passes)")
    max_request_pixels: int = Field(64_000_000, ge=1, description="pixels the images of one request may decode "
                                    "to, counted from their headers after reduce-on-decode (JPEG); beyond: 413")
    max_decoding_pixels: int = Field(128_000_000, ge=1, description="pixels being decoded at once in the process "
                                     "(~4 bytes each, plus copies); further large decodes wait their turn")

    max_body_bytes: int = Field(4 * MB, ge=1, description="request body of every route but the uploads "
                                "(JSON), enforced while it streams in; beyond: 413")
    body_timeout_s: float = Field(60.0, gt=0, description="time a client has to send a request body, from its "
                                  "first byte; beyond: 408 and the connection closed")

    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's headers, "
                                    "from its first byte (or from connecting); beyond: 408, connection closed")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle kept-alive connection is closed after this")
    shutdown_timeout_s: int = Field(20, ge=1, description="on SIGTERM, how long requests in flight may take to "
                                    "finish before they are cancelled and the process exits")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline for a request's images to be classified, "
                                     "from when they are queued; beyond: 504")
    worker_timeout_s: float = Field(20.0, gt=0, description="a forward worker that answers neither a batch nor "
                                    "a liveness ping within this is killed and replaced")

    @model_validator(mode="after")
    def _budgets(self) -> "Settings":
        if self.max_request_pixels > self.max_decoding_pixels:
            raise ValueError("max_request_pixels must not exceed max_decoding_pixels")
        return self

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        from models.backends import REQUESTS

        value = value.strip().lower()
        if value not in REQUESTS:
            raise ValueError(f"backend must be one of {', '.join(REQUESTS)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@lru_cache
def get_settings() -> Settings:
    return Settings()
