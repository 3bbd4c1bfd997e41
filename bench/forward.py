"""Bare batched forward throughput: the model alone, as the service's batcher calls it, in two
configurations: one forward at a time using all torch threads (the plain way), and the service's
own plan, several single-threaded forwards at once, in worker processes by default
(see app.service.execution_plan and app.workers)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from app.kinds.base import Handler
from bench.harness import machine_cpu_seconds


def _loop(forward: Callable, batch: torch.Tensor, seconds: float, counts: list[int], slot: int) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(batch)
        counts[slot] += len(batch)


@dataclass(frozen=True)
class Rate:
    images_per_s: float
    machine_cpu_ms_per_image: float  # CPU of the whole machine (all cores) per image while it ran


class _MachineClock:
    """Wall time and machine CPU time from construction to `rate(images)`."""

    def __init__(self) -> None:
        self.busy, self.started = machine_cpu_seconds()[0], time.perf_counter()

    def rate(self, images: int) -> Rate:
        elapsed, busy = time.perf_counter() - self.started, machine_cpu_seconds()[0] - self.busy
        return Rate(images / elapsed, busy / max(images, 1) * 1e3)


def concurrent_images_per_second(forward: Callable, batch: torch.Tensor, instances: int, seconds: float) -> Rate:
    """`forward(batch)` back to back in `instances` threads for `seconds`."""
    counts = [0] * instances
    workers = [threading.Thread(target=_loop, args=(forward, batch, seconds, counts, i)) for i in range(instances)]
    clock = _MachineClock()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return clock.rate(sum(counts))


async def concurrent_images_per_second_async(forward: Callable[[torch.Tensor], Awaitable], batch: torch.Tensor,
                                             instances: int, seconds: float) -> Rate:
    """`await forward(batch)` back to back in `instances` tasks for `seconds` (worker processes)."""
    async def loop() -> int:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await forward(batch)
            count += len(batch)
        return count

    await forward(batch)  # the first exchange opens the workers' streams
    clock = _MachineClock()
    counts = await asyncio.gather(*(loop() for _ in range(instances)))
    return clock.rate(sum(counts))


def random_batch(batch_size: int, input_size: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch_size, 3, input_size, input_size), dtype=torch.uint8)


def images_per_second(handler: Handler, batch: torch.Tensor, *, instances: int = 1, threads: int | None = None,
                      seconds: float = 3.0) -> Rate:
    """uint8 batch -> probabilities, back to back in `instances` threads, for `seconds` after a warm-up."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(3):
            handler.run(batch)
        return concurrent_images_per_second(handler.run, batch, instances, seconds)
    finally:
        torch.set_num_threads(previous)
