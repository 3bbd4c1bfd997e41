"""Shared fixtures: a real signserve process (uvicorn, loopback, free port) and sample images.

The server runs `python -m app` as a subprocess, exactly like `make serve`, and the tests talk to
it over HTTP. It serves a snapshot of models/checkpoints/ taken when the test run starts: training may
rewrite those files at any moment, and the accuracy test must evaluate the very file the server loaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import encode, free_port
from models.checkpoint import served_checkpoints
from models.paths import DEFAULT_CHECKPOINT_DIR, PROJECT_ROOT as ROOT

ARTIFACTS = ROOT / "artifacts"
# two worker processes load and warm up every model; slow on a busy 2-core CI box (override for busier ones)
STARTUP_TIMEOUT_S = float(os.environ.get("SIGNSERVE_TEST_STARTUP_TIMEOUT_S", 400))


@dataclass
class LiveServer:
    url: str
    checkpoint_dir: Path
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown (runs the lifespan exit)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def runtimes_chosen(client) -> bool:
    """Whether no model's runtime choice is still running in the background (app.service)."""
    return not any((m.get("backend") or {}).get("choosing") for m in client.get("/v1/models").json()["models"])


def start_server(checkpoint_dir: Path, log_path: Path, chosen: bool = True,
                 **settings: str | int | float) -> LiveServer:
    """`python -m app` with SIGNSERVE_* settings (backend torch unless given) on a free loopback port;
    returns once /readyz is 200 and, with `chosen`, every model's runtime is chosen and serving."""
    port = free_port()
    # torch unless a test asks for another backend: choosing one exports and measures (tests/test_backends.py)
    env = {**os.environ, "SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
           "SIGNSERVE_CHECKPOINT_DIR": str(checkpoint_dir), "SIGNSERVE_BACKEND": "torch"}
    env.update({f"SIGNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    log_file = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log_file,
                               stderr=subprocess.STDOUT)
    log_file.close()
    server = LiveServer(f"http://127.0.0.1:{port}", checkpoint_dir, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"signserve exited with {process.returncode} during start-up:\n{server.log()}")
            try:
                if client.get("/readyz").status_code == 200 and (not chosen or runtimes_chosen(client)):
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"signserve not ready after {STARTUP_TIMEOUT_S} s:\n{server.log()}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def checkpoint_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the served checkpoints (*.pt, not resume *.state.pt) as they are now."""
    paths = served_checkpoints(DEFAULT_CHECKPOINT_DIR)
    if not paths:
        pytest.fail(f"no checkpoints in {DEFAULT_CHECKPOINT_DIR}: the service has nothing to serve")
    snapshot = tmp_path_factory.mktemp("checkpoints")
    for path in paths:
        shutil.copy2(path, snapshot / path.name)
    return snapshot


@pytest.fixture(scope="session")
def cnn_snapshot(checkpoint_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The snapshot's cnn alone, for servers and apps whose tests are about the service around one
    classifier: each further model costs every worker process seconds of loading and warm-up."""
    only_cnn = tmp_path_factory.mktemp("cnn-checkpoint")
    shutil.copy2(checkpoint_snapshot / "cnn.pt", only_cnn / "cnn.pt")
    return only_cnn


@pytest.fixture(scope="session")
def server(checkpoint_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The service with its default settings, shared by the whole test run."""
    live = start_server(checkpoint_snapshot, tmp_path_factory.mktemp("server") / "server.log")
    yield live
    live.stop()


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def model_names(inprocess) -> list[str]:
    """The served checkpoints (an ensemble, which has no checkpoint or training of its own, is left out)."""
    return [m["name"] for m in inprocess.get("/v1/models").json()["models"] if not m.get("members")]


@pytest.fixture(scope="session")
def classifier_names(server: LiveServer) -> list[str]:
    """The served models that /v1/predict takes (the detector answers /v1/detect)."""
    with server.client() as c:
        return [m["name"] for m in c.get("/v1/models").json()["models"] if m["kind"] == "classifier"]


# --- sample images ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gtsrb_test_samples() -> list[tuple[str, int]]:
    """(path, class id) of the real GTSRB test images."""
    from models.paths import default_data_root
    from models.gtsrb import list_samples

    try:
        return list_samples(default_data_root(), "test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def sign_image(gtsrb_test_samples: list[tuple[str, int]]) -> tuple[Image.Image, int]:
    """One real GTSRB test image (RGB) and its class id."""
    path, label = gtsrb_test_samples[0]
    with Image.open(path) as image:
        return image.convert("RGB"), label


@pytest.fixture(scope="session")
def sign_png(sign_image: tuple[Image.Image, int]) -> bytes:
    return encode(sign_image[0], "PNG")


# --- skips ---------------------------------------------------------------------------------------

# In CI every component is installed (.ci/system-packages.sh), so a skip there hides a missing one:
# it fails, except where the hardware cannot be there.
SKIPS_ALLOWED_IN_CI = ("CUDA",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if in_ci and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(word in reason for word in SKIPS_ALLOWED_IN_CI):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where everything it needs is installed: {reason}"


# --- the app in process ---------------------------------------------------------------------------

@contextmanager
def app_client(checkpoint_dir: Path, **settings) -> Iterator["TestClient"]:
    """The real app (lifespan, models, batcher) in this process behind Starlette's TestClient; forwards
    run in threads, no warm-up, so it is ready in a second or two. Returns once /readyz is 200."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    config = Settings(checkpoint_dir=checkpoint_dir, worker_processes=False, warmup=False, instances=1,
                      **{"backend": "torch", **settings})  # torch unless asked: see start_server
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while client.get("/readyz").status_code != 200 or not runtimes_chosen(client):
            if time.monotonic() > deadline:
                raise RuntimeError(f"in-process app not ready: {client.get('/readyz').text}")
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="session")
def inprocess(checkpoint_snapshot: Path) -> Iterator["TestClient"]:
    """The app with its default settings, in process, serving the same snapshot as `server`: for the
    validation, bad-input, metadata and metrics tests (no process to start, no HTTP hop per request).
    End-to-end, batching, worker and shutdown tests use the real `server` process."""
    with app_client(checkpoint_snapshot) as client:
        yield client
