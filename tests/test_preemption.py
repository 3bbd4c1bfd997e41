"""A real signal in the middle of training, without Slurm: the run stops with exit code 99 and --resume
finishes it with every epoch trained and logged exactly once. Once for one process, once for a 2-process
torchrun job where only one rank is signalled (the others must not wait for it forever)."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from models.paths import default_data_root
from training.utils import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--model", "cnn", "--max-train-samples", "600", "--max-test-samples", "300", "--data-root",
         default_data_root()]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

pytestmark = pytest.mark.slow


def start(command: list[str], stdout: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(stdout, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_line(path: Path, pattern: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, path.read_text(), re.MULTILINE):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"no line matching {pattern!r}:\n{path.read_text()}")
        time.sleep(0.2)


def finish(process: subprocess.Popen, timeout: float = 180) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running after {timeout} s") from None


def csv_epochs(path: Path) -> list[int]:
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def logged_epochs(log: Path) -> list[str]:
    return re.findall(r"^epoch (\d+/\d+) ", log.read_text(), re.MULTILINE)


def test_sigusr1_mid_run_exits_99_and_resume_logs_every_epoch_once(tmp_path):
    out = tmp_path / "cnn.pt"
    command = [sys.executable, "-m", "training.train", *SMALL, "--epochs", "3", "--output", str(out)]
    first = start(command, tmp_path / "first.txt")
    wait_for_line(tmp_path / "first.txt", r"^epoch 1/3 ", first)
    first.send_signal(signal.SIGUSR1)
    assert finish(first) == EXIT_PREEMPTED, (tmp_path / "first.txt").read_text()
    stopped = (tmp_path / "first.txt").read_text()
    assert re.search(r"^(preempted during epoch 2|stopping after epoch 2)", stopped, re.MULTILINE), stopped
    done_before = csv_epochs(tmp_path / "cnn.metrics.csv")
    assert done_before in ([1], [1, 2])

    second = start([*command, "--resume"], tmp_path / "second.txt")
    assert finish(second) == 0, (tmp_path / "second.txt").read_text()
    assert f"after epoch {len(done_before)}" in (tmp_path / "second.txt").read_text()

    assert csv_epochs(tmp_path / "cnn.metrics.csv") == [1, 2, 3]
    assert logged_epochs(tmp_path / "cnn.log") == ["1/3", "2/3", "3/3"]  # continuous across both runs
    log = (tmp_path / "cnn.log").read_text()
    assert log.index("epoch 1/3") < log.index("resumed from") < log.index("epoch 3/3")
    loaded = load_checkpoint(out)
    assert [m["epoch"] for m in loaded.metrics] == [1, 2, 3]


def test_ddp_signal_to_one_rank_stops_every_rank_at_the_same_batch(tmp_path):
    out = tmp_path / "cnn.pt"
    # 625 samples do not split evenly: without DistributedSampler's padding one rank would run one step
    # more per epoch than the other and wait forever in that step's gradient all-reduce.
    command = [*TORCHRUN, "-m", "training.train", *SMALL, "--max-train-samples", "625", "--epochs", "2",
               "--output", str(out)]
    first = start(command, tmp_path / "first.txt")
    wait_for_line(tmp_path / "first.txt", r"^epoch 1/2 ", first)
    rank1 = worker_with_rank(first.pid, 1)
    os.kill(rank1, signal.SIGUSR1)  # rank 0 never sees a signal; it has to learn it from rank 1
    code = finish(first, timeout=120)
    text = (tmp_path / "first.txt").read_text()
    assert code != 0 and "preempted during epoch 2" in text, text
    assert csv_epochs(tmp_path / "cnn.metrics.csv") == [1]

    second = start([*command, "--resume"], tmp_path / "second.txt")
    assert finish(second) == 0, (tmp_path / "second.txt").read_text()
    assert csv_epochs(tmp_path / "cnn.metrics.csv") == [1, 2]
    assert logged_epochs(tmp_path / "cnn.log") == ["1/2", "2/2"]
    assert len(re.findall(r"^model cnn .* on cpu x2;", (tmp_path / "cnn.log").read_text(), re.MULTILINE)) == 2


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process whose RANK is `rank` (from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            status = (proc / "status").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if f"\nPPid:\t{launcher_pid}\n" in status and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"torchrun {launcher_pid} has no worker with RANK={rank}")
