"""Bare batched forward throughput: the model alone, as the service's batcher calls it, in two
configurations: one forward at a time using all torch threads (the plain way), and the service's
own plan, several single-threaded forwards at once, in worker processes by default
(see app.service.execution_plan and app.workers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from app.engine import Predictor


def _loop(forward: Callable, batch: torch.Tensor, seconds: float, counts: list[int], slot: int) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(batch)
        counts[slot] += len(batch)


def concurrent_images_per_second(forward: Callable, batch: torch.Tensor, instances: int, seconds: float) -> float:
    """`forward(batch)` back to back in `instances` threads for `seconds`."""
    counts = [0] * instances
    workers = [threading.Thread(target=_loop, args=(forward, batch, seconds, counts, i)) for i in range(instances)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - started)


def random_batch(batch_size: int, input_size: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch_size, 3, input_size, input_size), dtype=torch.uint8)


def images_per_second(predictor: Predictor, batch_size: int, *, instances: int = 1, threads: int | None = None,
                      seconds: float = 3.0) -> float:
    """uint8 batch -> probabilities, back to back in `instances` threads, for `seconds` after a warm-up."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        batch = random_batch(batch_size, predictor.input_size)
        for _ in range(3):
            predictor(batch)
        return concurrent_images_per_second(predictor, batch, instances, seconds)
    finally:
        torch.set_num_threads(previous)
