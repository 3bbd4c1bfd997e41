"""Evaluate a checkpoint on a GTSRB test split with the checkpoint's own preprocessing.

    python -m training.evaluate --checkpoint models/checkpoints/cnn.pt --data-root ../shared/data

The last stdout line is JSON: {"accuracy": float, "loss": float, "n": int}.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from models.checkpoint import load_checkpoint
from models.paths import default_data_root
from models.preprocessing import Preprocessing, normalize
from models.gtsrb import TensorSplit, load_split
from training.metrics import LossAccuracy


@torch.inference_mode()
def evaluate(model: nn.Module, split: TensorSplit, pre: Preprocessing, device: torch.device,
             batch_size: int = 500, autocast: bool = False, shard: tuple[int, int] = (0, 1)) -> dict:
    """Mean cross-entropy and accuracy over `split`; with shard=(rank, world) each rank takes every
    world-th sample and the sums are all-reduced, so every rank returns the global figures."""
    was_training = model.training
    model.eval()
    rank, world = shard
    images, labels = split.images[rank::world], split.labels[rank::world]
    totals = LossAccuracy(device)
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size].to(device, non_blocking=True), pre)
        x = x.contiguous(memory_format=torch.channels_last)  # as training feeds it: faster convolutions
        y = labels[start:start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        totals.update(logits, y)
    model.train(was_training)
    return totals.result(world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default=default_data_root(), help="folder holding gtsrb/ (env GTSRB_ROOT)")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    loaded = load_checkpoint(args.checkpoint, device=args.device)
    split = load_split(args.data_root, args.split, loaded.preprocessing)
    model = loaded.model.to(memory_format=torch.channels_last)
    result = evaluate(model, split, loaded.preprocessing, loaded.device, args.batch_size)
    print(f"{loaded.architecture} on {len(split)} {args.split} images: "
          f"accuracy {result['accuracy']:.4f}, cross-entropy {result['loss']:.4f}")
    print(json.dumps({"accuracy": result["accuracy"], "loss": result["loss"], "n": result["n"]}))


if __name__ == "__main__":
    main()
