"""bench.input_sizes: the speed half of the input-size trade-off (a benchmark: its figures are read,
not asserted; this checks that it measures what it says)."""

import math

import torch

from bench.input_sizes import images_per_second


def test_it_times_a_training_step_and_a_forward_at_the_size_asked():
    train, infer = images_per_second("cnn", 48, batch_size=8, steps=1, device=torch.device("cpu"))
    assert 0 < train < math.inf and 0 < infer < math.inf


def test_it_times_training_in_bf16_autocast_when_asked():
    train, _ = images_per_second("cnn", 32, batch_size=8, steps=1, device=torch.device("cpu"), autocast=True)
    assert 0 < train < math.inf
