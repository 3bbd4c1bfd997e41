"""What a training run needs around the model, as torchvision's references keep it in utils.py:
distributed set-up, preemption signals, logging, a description of the machine and the weights' moving average."""

from __future__ import annotations

import os
import platform
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

EXIT_PREEMPTED = 99  # the exit status of a run stopped by a signal; Slurm's batch script requeues on it


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); torchrun's env vars turn on DDP (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def teardown_distributed(world: int) -> None:
    """On every rank at a normal exit (done or preempted). The barrier lets no rank close its gloo
    connections while a peer still uses them: a rank that exits first can abort the other
    ("terminate called without an active exception", seen once under load)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


class Preemption:
    """Remembers that SIGUSR1/SIGTERM arrived; the loop checks it between batches."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, world: int, device: torch.device) -> bool:
        """True on every rank as soon as any rank got the signal. Slurm and torchrun deliver it to
        each process at a slightly different batch; a rank that left the loop alone would leave the
        others waiting in the next gradient all-reduce, or failing in it once its process is gone."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Logger:
    """Prints on rank 0 and appends the same line to <name>.log."""

    def __init__(self, path: Path | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def progress_bar(total: int, epoch: int, enabled: bool):
    """A tqdm bar while a person watches a terminal; None for batch jobs, which get plain lines."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)


def describe_machine(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}"
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"CPU {name}, {torch.get_num_threads()} threads"
    return f"{world} x {name}" if world > 1 else name


def model_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s weights and BatchNorm statistics, to update after each
    optimizer step: an ensemble of the last ~1 / (1 - decay) steps' weights at the cost of one model."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def broadcast_buffers(module: nn.Module, world: int) -> nn.Module:
    """`module` with rank 0's buffers (BatchNorm statistics) on every rank."""
    if world > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
    return module
