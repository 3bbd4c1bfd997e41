"""The epoch loop every trainer shares: its run files, resume, stop on a signal, and after each epoch
the checkpoint, metrics CSV, resume state and one log line, written atomically.

A trainer (training.train, training.train_detector) builds its model, optimizer and data, then hands
`run_epochs` one function: epoch number -> that epoch's figures (None when a signal stopped it).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import RESUME_SUFFIX, CheckpointError, atomic_save, atomic_write_text, metrics_csv, safe_load, unwrap
from training.utils import EXIT_PREEMPTED, Logger, Preemption, barrier

# how a figure is printed in the per-epoch log line (default: 4 decimals)
LOG_FORMATS = {"seconds": ".1f", "score_threshold": ".2f"}


@dataclass
class RunFiles:
    """What a run writes next to its checkpoint."""

    checkpoint: Path
    state: Path  # optimizer, schedule and RNG state for --resume
    csv: Path
    log: Path

    @classmethod
    def beside(cls, output: str | Path) -> "RunFiles":
        out = Path(output)
        stem = out.with_suffix("")
        return cls(out, Path(f"{stem}{RESUME_SUFFIX}"), Path(f"{stem}.metrics.csv"), Path(f"{stem}.log"))

    def prepare(self, fresh: bool) -> None:
        """On rank 0: the folder exists; a fresh run drops an older run's resume state and log lines."""
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.state.unlink(missing_ok=True)
            self.log.unlink(missing_ok=True)


def init_weights(model: nn.Module, how: str) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if how == "zeros":
                # Every unit computes the same thing: ReLU(0) = 0 upstream, so every weight gradient
                # but the last layer's bias is zero and the network only learns the class prior.
                nn.init.zeros_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BatchNorm and biases: decaying them only fights the normalisation."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(getattr(optimizer, "base_optimizer", optimizer), factor)


@dataclass
class Loop:
    """A run's state between epochs and where it goes."""

    name: str  # the model, recorded in the resume state (a state of another model is refused)
    files: RunFiles
    log: Logger
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epochs: int
    checkpoint: Callable[[list[dict]], dict]  # metrics so far -> the servable checkpoint (models.checkpoint)
    csv_fields: tuple[str, ...] | None = None  # metrics CSV columns (None: models.checkpoint's default)
    stop_after_epochs: int | None = None  # stop as if preempted after this many epochs of this invocation
    extra_state: dict[str, Callable] = field(default_factory=dict)  # key -> (state_dict, load_state_dict)
    metrics: list[dict] = field(default_factory=list)  # one row per completed epoch, resumed ones included

    def restore(self) -> None:
        """Continue after the last completed epoch of the resume state, when there is one; a state file
        that is not one stops the run (exit status 2) naming the problem."""
        if not self.files.state.is_file():
            return
        try:
            state = safe_load(self.files.state)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if state.get("model_name") != self.name:
            raise SystemExit(f"{self.files.state} holds a {state.get('model_name')} run, not {self.name}")
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        for key, (_, load) in self.extra_state.items():
            load(state[key])
        self.metrics = list(state["metrics"])
        self.log(f"resumed from {self.files.state} after epoch {len(self.metrics)}")

    def save(self) -> None:
        """Checkpoint, CSV, then the resume state, each atomically: a crash in between at worst repeats
        an epoch whose outputs are simply rewritten."""
        atomic_save(self.checkpoint(self.metrics), self.files.checkpoint)
        atomic_write_text(metrics_csv(self.metrics, self.csv_fields), self.files.csv)
        atomic_save({"model_name": self.name, "model": unwrap(self.model).state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng_cpu": torch.get_rng_state(), "metrics": self.metrics,
                     **{key: get() for key, (get, _) in self.extra_state.items()}}, self.files.state)


def distributed(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """The module the epochs train: DDP around `model` when more than one process trains."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def log_line(epoch: int, epochs: int, row: dict) -> str:
    figures = " ".join(f"{k} {v:{LOG_FORMATS.get(k, '.4f')}}" for k, v in row.items() if k != "epoch")
    return f"epoch {epoch}/{epochs} {figures}"


def run_epochs(loop: Loop, train_epoch: Callable[[int], dict | None], preemption: Preemption) -> int:
    """Train the remaining epochs: `train_epoch(epoch)` trains and evaluates one (its figures; None when
    a signal stopped it mid-epoch), then rank 0 writes the run files and logs one line. Returns the exit
    status: 0 when every epoch is done, EXIT_PREEMPTED when a signal or --stop-after-epochs stopped it;
    the same command with --resume then continues at the next epoch, none lost or logged twice."""
    epochs_this_run = 0
    for epoch in range(len(loop.metrics) + 1, loop.epochs + 1):
        started = time.perf_counter()
        figures = train_epoch(epoch)
        if figures is None:
            loop.log(f"preempted during epoch {epoch}; state kept at epoch {len(loop.metrics)}, resume with --resume")
            return EXIT_PREEMPTED
        loop.metrics.append({"epoch": epoch, **figures, "seconds": time.perf_counter() - started})
        if loop.rank == 0:
            loop.save()
        loop.log(log_line(epoch, loop.epochs, loop.metrics[-1]))
        barrier(loop.world)
        epochs_this_run += 1
        stop = loop.stop_after_epochs and epochs_this_run >= loop.stop_after_epochs
        if (preemption.agreed(loop.world, loop.device) or stop) and epoch < loop.epochs:
            loop.log(f"stopping after epoch {epoch}; resume with --resume")
            return EXIT_PREEMPTED
    return 0
