"""`make train` through a real Slurm (.ci/slurm/start.sh runs a one-node cluster on loopback).

Jobs request no GPU (submit.sh sees no gpu GRES in `sinfo`) and write checkpoints to a temporary
SIGNSERVE_CHECKPOINT_DIR; their output files land in logs/ as on a cluster.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMALL = "--max-train-samples 600 --max-test-samples 300"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) train_loss (\d+\.\d+) train_accuracy (\d+\.\d+) "
                        r"test_loss (\d+\.\d+) test_accuracy (\d+\.\d+) ", re.MULTILINE)
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("sbatch") and shutil.which("sinfo")),
                       reason="no Slurm client on the PATH (CI installs slurm-wlm and runs .ci/slurm/start.sh)"),
]


def make_train(tmp_path: Path, epochs: int, **env: str) -> tuple[str, Path]:
    """Run `make train` with a job name of its own; return the job id and its output file."""
    job_name = f"signserve-test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(["make", "--no-print-directory", "train", "MODEL=cnn", f"EPOCHS={epochs}", f"ARGS={SMALL}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SIGNSERVE_CHECKPOINT_DIR": str(tmp_path), "JOB_NAME": job_name, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"^submitted job (\d+)", result.stdout, re.MULTILINE).group(1)
    output = Path(re.search(r"^output file: (.+)$", result.stdout, re.MULTILINE).group(1))
    assert output == ROOT / "logs" / f"{job_name}-{job_id}.out"
    return job_id, output


def job_info(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_until(predicate, job_id: str, output: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=30)
            text = output.read_text() if output.exists() else "(no output file)"
            raise AssertionError(f"job {job_id}: {what} not within {timeout} s; {job_info(job_id)}\n{text}")
        time.sleep(1)


def wait_for_job(job_id: str, output: Path, timeout: float) -> dict[str, str]:
    wait_until(lambda: job_info(job_id)["JobState"] in FINISHED, job_id, output, timeout, "end")
    return job_info(job_id)


def epoch_lines(output: Path) -> list[tuple[int, int, float, float, float, float]]:
    return [(int(e), int(n), *map(float, figures)) for e, n, *figures in EPOCH_LINE.findall(output.read_text())]


def csv_epochs(path: Path) -> list[int]:
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_cluster_is_up():
    nodes = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True, text=True,
                           timeout=30, check=True).stdout.split("\n")
    assert any(re.search(r" (idle|mix|alloc)", line) for line in nodes), nodes


def test_make_train_submits_a_job_that_logs_every_figure_and_writes_a_loadable_checkpoint(tmp_path):
    job_id, output = make_train(tmp_path, epochs=1, CPUS="1")
    info = wait_for_job(job_id, output, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output.read_text()
    # the batch script's own directives, with CPUs and GPUs adjusted for this GPU-less node
    assert info["TimeLimit"] == "02:00:00" and info["Requeue"] == "1" and info["NumCPUs"] == "1"
    assert info["StdOut"] == str(output)

    [(epoch, epochs, train_loss, train_acc, test_loss, test_acc)] = epoch_lines(output)
    assert (epoch, epochs) == (1, 1) and train_loss > 0 and test_loss > 0 and 0 <= train_acc <= 1 and 0 <= test_acc <= 1
    loaded = load_checkpoint(tmp_path / "cnn.pt")
    [metrics] = loaded.metrics
    assert (round(metrics["train_loss"], 4), round(metrics["test_accuracy"], 4)) == (train_loss, test_acc)
    assert loaded.architecture == "cnn" and loaded.data["train_samples"] == 600 and loaded.data["test_samples"] == 300


def preempt_and_resume(tmp_path: Path, epochs: int, **env: str) -> tuple[Path, str]:
    """Submit, send the batch shell Slurm's SIGUSR1 once epoch 1 is logged, wait for the requeued job."""
    job_id, output = make_train(tmp_path, epochs=epochs, **env)
    wait_until(lambda: output.exists() and re.search(rf"^epoch 1/{epochs} ", output.read_text(), re.MULTILINE),
               job_id, output, timeout=240, what="epoch 1")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    info = wait_for_job(job_id, output, timeout=300)
    text = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text
    assert "got SIGUSR1" in text and f"requeueing job {job_id}" in text
    assert re.search(r"^=== job \d+ attempt 2", text, re.MULTILINE), text
    assert re.search(r"^resumed from .* after epoch [1-9]", text, re.MULTILINE), text
    # every epoch exactly once in the output file both attempts appended to, in the CSV and the checkpoint
    assert [e for e, *_ in epoch_lines(output)] == list(range(1, epochs + 1)), text
    assert csv_epochs(tmp_path / "cnn.metrics.csv") == list(range(1, epochs + 1))
    assert [m["epoch"] for m in load_checkpoint(tmp_path / "cnn.pt").metrics] == list(range(1, epochs + 1))
    return output, text


def test_preempted_job_requeues_itself_and_resumes_without_losing_or_repeating_an_epoch(tmp_path):
    _, text = preempt_and_resume(tmp_path, epochs=3, CPUS="1")
    assert re.search(r"^(preempted during epoch 2|stopping after epoch 2)", text, re.MULTILINE), text


def test_ddp_job_runs_srun_torchrun_and_survives_preemption(tmp_path):
    _, text = preempt_and_resume(tmp_path, epochs=2, CPUS="2", NPROC_PER_NODE="2")
    assert "1 node(s) x 2 process(es)" in text
    assert len(re.findall(r"^model cnn .* on cpu x2;", text, re.MULTILINE)) == 2  # rank 0 only, per attempt


# --- the request against what sinfo reports: never a job that can never start ---------------------------

def submit(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "train", "MODEL=cnn", "EPOCHS=1", f"ARGS={SMALL}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SIGNSERVE_CHECKPOINT_DIR": str(tmp_path),
                               "JOB_NAME": f"signserve-test-{uuid.uuid4().hex[:8]}", **env})


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return max(int(line) for line in out.split())


@pytest.mark.parametrize("variable,value", [("CPUS", "4096"), ("GPUS", "1"), ("NODES", "64")])
def test_a_request_no_node_can_run_is_refused_naming_the_variable(tmp_path, variable, value):
    env = {variable: value}
    if variable != "CPUS":
        env["CPUS"] = "1"
    if variable == "NODES":
        env["GPUS"] = "0"
    result = submit(tmp_path, **env)
    assert result.returncode != 0 and "submitted job" not in result.stdout, result.stdout + result.stderr
    assert f"submit.sh: {variable}={value} asks for" in result.stderr, result.stderr


def test_the_scripts_default_cpus_are_clamped_to_the_largest_node(tmp_path):
    """train.sbatch asks for 4 CPUs: a smaller node gets the job at its size, with a note; a node of 4 or
    more gets it as written."""
    cpus = node_cpus()
    result = submit(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    clamped = f"asks for --cpus-per-task=4, but the largest node in partition debug has {cpus}"
    assert (clamped in result.stdout) == (cpus < 4), result.stdout
    job_id = re.search(r"^submitted job (\d+)", result.stdout, re.MULTILINE).group(1)
    try:
        info = job_info(job_id)
        assert info["NumCPUs"] == str(min(cpus, 4)) and info.get("Reason") != "PartitionConfig", info
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
