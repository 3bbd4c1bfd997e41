"""1-epoch smoke runs and stop/resume on a small subset of the real GTSRB data."""

import csv
import io
import json
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from models.paths import default_data_root
from models.gtsrb import list_samples

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--max-train-samples", "600", "--max-test-samples", "300", "--batch-size", "64"]
TINY = ["--max-train-samples", "256", "--max-test-samples", "128", "--batch-size", "64"]  # 4 steps an epoch
FIELDS = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"]


def train_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m training.train`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "training.train", "--data-root", default_data_root(), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def train_here(*args: str) -> subprocess.CompletedProcess:
    """training.train's main in this process, with the exit status and output the CLI gives: a new
    interpreter spends ~4 s of CPU importing torch before its first batch."""
    from training.train import main

    argv = ["--data-root", default_data_root(), *args]
    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}  # main() sets its own
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse and the flag checks; a message exits 1, as in the interpreter
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                code = 1 if isinstance(stop.code, str) else stop.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, code or 0, stdout.getvalue(), stderr.getvalue())


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = train_here(*args)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("epoch ")]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-epoch") / "cnn.pt"
    result = train_cli("--model", "cnn", "--epochs", "1", "--output", str(out), *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_one_epoch_logs_all_four_figures_to_stdout_csv_log_and_checkpoint(one_epoch_run):
    out, result = one_epoch_run
    tmp_path = out.parent
    [line] = epoch_lines(result.stdout)
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"):
        assert f" {name} " in line
    rows = read_csv(tmp_path / "cnn.metrics.csv")
    assert list(rows[0]) == FIELDS and len(rows) == 1
    assert 0.0 <= float(rows[0]["test_accuracy"]) <= 1.0 and float(rows[0]["train_loss"]) > 0
    assert line in (tmp_path / "cnn.log").read_text()
    loaded = load_checkpoint(out)
    assert loaded.metrics[0]["test_accuracy"] == pytest.approx(float(rows[0]["test_accuracy"]), abs=1e-6)
    assert loaded.data["train_samples"] == 600 and loaded.data["test_samples"] == 300
    assert loaded.train_args["optimizer"] == "sgd" and loaded.start_weights == "random"


def test_stopped_run_resumes_at_the_next_epoch_and_matches_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full" / "cnn.pt"
    train("--model", "cnn", "--epochs", "3", "--output", str(full), *TINY)

    parted = tmp_path / "parted" / "cnn.pt"
    first = train("--model", "cnn", "--epochs", "3", "--output", str(parted), "--stop-after-epochs", "1", *TINY,
                  check=False)
    assert first.returncode == 99, first.stderr
    assert [int(r["epoch"]) for r in read_csv(parted.with_suffix(".metrics.csv"))] == [1]
    second = train("--model", "cnn", "--epochs", "3", "--output", str(parted), "--resume", *TINY)
    assert "resumed" in second.stdout and len(epoch_lines(second.stdout)) == 2

    rows = read_csv(parted.with_suffix(".metrics.csv"))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    log_epochs = [line.split()[1] for line in epoch_lines(parted.with_suffix(".log").read_text())]
    assert log_epochs == ["1/3", "2/3", "3/3"]  # every epoch once, across both invocations
    # Model, optimizer, schedule and RNG state were all restored: the curves are the uninterrupted ones.
    reference = read_csv(full.with_suffix(".metrics.csv"))
    for a, b in zip(rows, reference):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), (key, a, b)


    # Resuming a finished run trains nothing and leaves the log alone.
    third = train("--model", "cnn", "--epochs", "3", "--output", str(parted), "--resume", *TINY)
    assert epoch_lines(third.stdout) == [] and len(read_csv(parted.with_suffix(".metrics.csv"))) == 3


@pytest.mark.parametrize("optimizer", ["sam", "adamw"])
def test_other_optimizers_train(tmp_path, optimizer):
    out = tmp_path / "cnn.pt"
    train("--model", "cnn", "--epochs", "1", "--optimizer", optimizer, "--output", str(out),
          "--max-train-samples", "256", "--max-test-samples", "100", "--train-metrics", "running")
    assert load_checkpoint(out).train_args["optimizer"] == optimizer
    assert len(read_csv(tmp_path / "cnn.metrics.csv")) == 1


def test_zero_init_learns_only_the_class_prior(tmp_path):
    out = tmp_path / "cnn.pt"
    result = train("--model", "cnn", "--epochs", "1", "--init", "zeros", "--output", str(out), *SMALL)
    rows = read_csv(tmp_path / "cnn.metrics.csv")
    # All logits equal up to the head's bias: one class for every image, accuracy = that class's share.
    assert float(rows[-1]["train_accuracy"]) < 0.10, result.stdout
    loaded = load_checkpoint(out)
    assert all(float(p.detach().abs().sum()) == 0 for p in loaded.model.features.parameters() if p.ndim == 4)


def test_epochs_above_the_bound_are_refused(tmp_path):
    result = train("--model", "cnn", "--epochs", "61", "--output", str(tmp_path / "x.pt"), check=False)
    assert result.returncode != 0 and "between 1 and 60" in result.stderr


def test_model_ema_averages_weights_and_batchnorm_statistics():
    import torch
    from torch import nn

    from training.utils import model_ema

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = model_ema(model, decay=0.9)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update_parameters(model)
    averaged = ema.module.state_dict()
    assert torch.allclose(averaged["0.weight"], 0.9 * first["0.weight"] + 0.1 * model[0].weight)
    assert torch.allclose(averaged["1.running_mean"], 0.9 * first["1.running_mean"] + 0.1 * 2.0)


def test_model_ema_run_checkpoints_the_average_and_resumes_it(tmp_path):
    import torch

    from models.checkpoint import safe_load

    ema = ["--model-ema", "--model-ema-decay", "0.5", "--train-metrics", "running"]
    full = tmp_path / "full" / "cnn.pt"
    train("--model", "cnn", "--epochs", "3", "--output", str(full), *ema, *TINY)
    parted = tmp_path / "parted" / "cnn.pt"
    first = train("--model", "cnn", "--epochs", "3", "--output", str(parted), "--stop-after-epochs", "2", *ema, *TINY,
                  check=False)
    assert first.returncode == 99, first.stderr
    train("--model", "cnn", "--epochs", "3", "--output", str(parted), "--resume", *ema, *TINY)

    rows, reference = read_csv(parted.with_suffix(".metrics.csv")), read_csv(full.with_suffix(".metrics.csv"))
    assert list(rows[0]) == [*FIELDS[:-1], "online_test_accuracy", "seconds"]
    for a, b in zip(rows, reference, strict=True):  # the average was restored with the rest of the state
        for key in ("test_loss", "test_accuracy", "online_test_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), (key, a, b)
    state = safe_load(full.with_suffix(".state.pt"))
    served = load_checkpoint(full).model.state_dict()
    average = {k.removeprefix("module."): v for k, v in state["model_ema"].items() if k.startswith("module.")}
    assert all(torch.equal(served[k].float(), average[k].float()) for k in served)
    assert any(not torch.equal(served[k].float(), state["model"][k].float()) for k in served if "weight" in k)


def test_pretrained_resnet_offline_stops_with_instructions(tmp_path, monkeypatch):
    # offline on any runner: an empty weights cache, and every download sent to a closed loopback port
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    for bypass in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(bypass, raising=False)
    env_free = train("--model", "resnet18", "--start-weights", "imagenet", "--epochs", "1",
                     "--output", str(tmp_path / "r.pt"), *SMALL, check=False)
    assert env_free.returncode == 2
    assert "--weights PATH" in env_free.stderr
    assert not (tmp_path / "r.pt").exists()


def test_evaluate_prints_json_last(one_epoch_run):
    out, _ = one_epoch_run
    result = subprocess.run([sys.executable, "-m", "training.evaluate", "--checkpoint", str(out),
                             "--data-root", default_data_root()], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"accuracy", "loss", "n"} and report["n"] == len(list_samples(default_data_root(), "test"))
    assert 0 <= report["accuracy"] <= 1


def test_bf16_autocast_is_chosen_where_the_hardware_has_it():
    import torch

    from training.train import use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16("auto", cpu, {"avx2", "avx512_bf16"}) and use_bf16("auto", cpu, {"amx_bf16"})
    assert not use_bf16("auto", cpu, {"avx2", "avx512f"})
    assert use_bf16("auto", cuda, set())
    assert not use_bf16("fp32", cuda, {"avx512_bf16"}) and use_bf16("bf16", cpu, set())
