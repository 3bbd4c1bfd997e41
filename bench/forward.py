"""Bare batched forward throughput: the model alone, as the service's batcher calls it."""

from __future__ import annotations

import time

import torch

from app.engine import Predictor


def images_per_second(predictor: Predictor, batch_size: int, min_seconds: float = 3.0) -> float:
    """uint8 batch -> probabilities, back to back, for at least `min_seconds` after a warm-up."""
    size = predictor.input_size
    batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    for _ in range(3):
        predictor(batch)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds:
        predictor(batch)
        done += batch_size
    return done / elapsed
