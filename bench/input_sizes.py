"""What an input size costs: training and inference images/s of each classifier at the sizes worth
considering, on this machine's CPU (or GPU), torch NHWC as the trainer and evaluation run them: training
steps in the precision the trainer chooses here (`--precision auto`: bf16 autocast on CUDA and on CPUs
with native bf16), inference in fp32.

    python -m bench.input_sizes                     # cnn at 32/48/64, resnet18 at 64/80/96
    python -m bench.input_sizes --batch-size 64 --steps 4

Accuracy at each size comes from training at it (docs/training.md); this is the other half of the
trade-off. Compare sizes within one run: the machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from models.architectures import build_model
from models.classes import NUM_CLASSES
from training.train import use_bf16

SIZES = {"cnn": (32, 48, 64), "resnet18": (64, 80, 96)}


def images_per_second(architecture: str, size: int, batch_size: int, steps: int,
                      device: torch.device, autocast: bool = False) -> tuple[float, float]:
    """(training step, inference) images/s: SGD steps with backward, then eval-mode forwards."""
    torch.manual_seed(0)
    model = build_model(architecture, input_size=size).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(fn) -> float:
        fn()  # warm-up: lazy initialisation, allocator pools
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * batch_size / (time.perf_counter() - started)

    train = timed(step)
    model.eval()
    with torch.inference_mode():
        infer = timed(lambda: model(x))
    return train, infer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="the trainer's default")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-images", type=int, default=39209, help="for the epoch-time column")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="of the training steps, as training.train's flag")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    autocast = use_bf16(args.precision, device)
    print(f"{device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"training in {'bf16 autocast' if autocast else 'fp32'}")
    print("| model | input | training images/s | epoch of the train split | inference images/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for architecture, sizes in SIZES.items():
        for size in sizes:
            train, infer = images_per_second(architecture, size, args.batch_size, args.steps, device, autocast)
            print(f"| {architecture} | {size}x{size} | {train:.0f} | {args.train_images / train:.0f} s | {infer:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
