"""The image built and run for real: docker/container.sh (what `make container-up` runs) builds it, starts
docker/compose.yaml with Docker or podman, and the service answers through the published port.

Runs where a container engine is installed (.ci/system-packages.sh installs podman); skipped elsewhere.
The stack gets its own compose project, port and checkpoint folder, and is brought down even when a
test fails; the last test checks that nothing (container, network, API socket, socket service) is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import start_server
from helpers import files, free_port

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker" / "container.sh"
SERVICE_USER = 10001  # the Dockerfile's USER
UP_TIMEOUT_S = 1800  # a first build on a fresh machine installs ~5.5 GB of torch


@dataclass
class Stack:
    project: str
    url: str
    checkpoints: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        # its own process group, so that a timeout also ends the engine commands it started (a build)
        process = subprocess.Popen(["bash", str(SCRIPT), *args], env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            stdout, stderr = process.communicate()
            raise AssertionError(f"container.sh {' '.join(args)}: no answer in {timeout} s:\n{stdout}\n{stderr}")
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if check:
            assert result.returncode == 0, f"container.sh {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def container_id(self) -> str:
        return self.run("compose", "ps", "-q", "api").stdout.strip()


def leftovers(stack: Stack) -> dict[str, str]:
    """What the stack may leave behind, as the engine sees it (empty strings when nothing is left)."""
    label = f"label=com.docker.compose.project={stack.project}"
    return {
        "containers": stack.run("engine", "ps", "-a", "-q", "--filter", label).stdout.strip(),
        "networks": stack.run("engine", "network", "ls", "-q", "--filter", label).stdout.strip(),
    }


def podman_services() -> set[str]:
    result = subprocess.run(["pgrep", "-f", "podman system service"], capture_output=True, text=True)
    return set(result.stdout.split())


def podman_sockets() -> set[Path]:
    return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("signserve-podman.*"))


@pytest.fixture(scope="module")
def stack(checkpoint_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if subprocess.run(["bash", str(SCRIPT), "which"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no container engine (Docker or podman; `bash .ci/system-packages.sh` installs podman)")
    checkpoints = tmp_path_factory.mktemp("container-checkpoints")
    shutil.copy2(checkpoint_snapshot / "cnn.pt", checkpoints / "cnn.pt")
    checkpoints.chmod(0o755)  # the service user (uid 10001) reads the bind mount
    (checkpoints / "cnn.pt").chmod(0o644)
    port = free_port()
    project = f"signserve-test-{os.getpid()}"
    env = {**os.environ, "SIGNSERVE_PROJECT": project, "SIGNSERVE_PORT": str(port),
           "SIGNSERVE_BIND": "127.0.0.1", "SIGNSERVE_CHECKPOINTS": str(checkpoints)}
    live = Stack(project, f"http://127.0.0.1:{port}", checkpoints, env)
    try:
        live.run("up", timeout=UP_TIMEOUT_S)
        yield live
    finally:
        live.run("down", timeout=300, check=False)


def predict(url: str, image: bytes, model: str) -> dict:
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/v1/predict", params={"model": model}, files=files(("sign.png", image)))
    assert response.status_code == 200, response.text
    return response.json()


def test_the_healthy_container_answers_like_the_service_on_the_host(stack, sign_png, sign_image, tmp_path):
    assert stack.run("health").stdout.strip() == "healthy"
    in_container = predict(stack.url, sign_png, "cnn")
    # `make serve` on the host (python -m app), serving the same checkpoint file
    (tmp_path / "checkpoints").mkdir()
    shutil.copy2(stack.checkpoints / "cnn.pt", tmp_path / "checkpoints" / "cnn.pt")
    host = start_server(tmp_path / "checkpoints", tmp_path / "host.log")
    try:
        on_host = predict(host.url, sign_png, "cnn")
    finally:
        host.stop()
    assert in_container["model"] == "cnn"
    [mine], [theirs] = in_container["results"], on_host["results"]
    assert mine["predictions"][0]["class_id"] == sign_image[1]  # a real GTSRB test image, classified right
    assert [p["class_id"] for p in mine["predictions"]] == [p["class_id"] for p in theirs["predictions"]]
    for a, b in zip(mine["predictions"], theirs["predictions"]):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


READ_ONLY_PROBE = r"""
id -u
grep -E '^(Uid|Gid):' /proc/1/status
tr '\0' ' ' < /proc/1/cmdline; echo
for dir in /app /opt/venv /etc; do echo x 2>&1 > "$dir/written-by-test" || true; done
echo x > /tmp/scratch && cat /tmp/scratch
"""


def test_the_service_runs_unprivileged_on_a_read_only_root(stack):
    container = stack.container_id()
    inspect = "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}"
    assert stack.run("engine", "inspect", "--format", inspect, container).stdout.split() == ["true", "10001:10001"]
    probe = stack.run("engine", "exec", container, "sh", "-c", READ_ONLY_PROBE)  # as the image's user
    lines = (probe.stdout + probe.stderr).splitlines()
    assert lines[0] == str(SERVICE_USER), probe
    for line in lines[1:3]:  # pid 1 is the server itself: real, effective, saved and fs ids all unprivileged
        assert line.split()[1:] == [str(SERVICE_USER)] * 4, lines
    assert lines[3].strip() == "python -m app"
    for directory in ("/app", "/opt/venv", "/etc"):
        [error] = [line for line in lines if f"{directory}/written-by-test" in line]
        assert "Read-only file system" in error, lines
    assert "x" in lines  # /tmp is a writable tmpfs


def test_a_restart_serves_a_checkpoint_added_on_the_host(stack, checkpoint_snapshot, sign_png, sign_image):
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["cnn"]
    before = stack.container_id()
    shutil.copy2(checkpoint_snapshot / "resnet18.pt", stack.checkpoints / "resnet18.pt")
    (stack.checkpoints / "resnet18.pt").chmod(0o644)
    stack.run("compose", "restart", "api", timeout=120)
    stack.run("wait", timeout=900)
    assert stack.container_id() == before  # the same container, restarted
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        names = {m["name"] for m in client.get("/v1/models").json()["models"]}
    # with both members present the service also offers their ensemble
    assert names in ({"cnn", "resnet18"}, {"cnn", "resnet18", "ensemble"}), names
    answer = predict(stack.url, sign_png, "resnet18")
    assert answer["model"] == "resnet18"
    assert answer["results"][0]["predictions"][0]["class_id"] == sign_image[1]


def test_down_leaves_nothing_behind(stack):
    services, sockets = podman_services(), podman_sockets()
    assert leftovers(stack)["containers"] != ""  # the check can see the stack while it is up
    stack.run("down", timeout=300)
    assert leftovers(stack) == {"containers": "", "networks": ""}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{stack.url}/readyz", timeout=5)
    deadline = time.monotonic() + 10  # each command stops the socket service it started
    while (podman_services() - services or podman_sockets() - sockets) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert podman_services() <= services and podman_sockets() <= sockets
