"""Bare batched forward throughput: the model alone, as the service's batcher calls it, in two
configurations: one forward at a time using all torch threads (the plain way), and the service's
own plan, several single-purpose forwards at once (see app.service.execution_plan)."""

from __future__ import annotations

import threading
import time

import torch

from app.engine import Predictor


def _loop(predictor: Predictor, batch: torch.Tensor, seconds: float, counts: list[int], slot: int) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor(batch)
        counts[slot] += len(batch)


def images_per_second(predictor: Predictor, batch_size: int, *, instances: int = 1, threads: int | None = None,
                      seconds: float = 3.0) -> float:
    """uint8 batch -> probabilities, back to back in `instances` threads, for `seconds` after a warm-up."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        size = predictor.input_size
        batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
        for _ in range(3):
            predictor(batch)
        counts = [0] * instances
        workers = [threading.Thread(target=_loop, args=(predictor, batch, seconds, counts, i)) for i in range(instances)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
