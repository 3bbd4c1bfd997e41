"""Markdown tables of the per-epoch metrics of checkpoints (the README's results section comes from this).

    python -m training.report models/checkpoints/cnn.pt models/checkpoints/resnet18.pt
"""

from __future__ import annotations

import argparse

from models.checkpoint import load_checkpoint


def markdown_table(path: str) -> str:
    loaded = load_checkpoint(path)
    args, data = loaded.train_args, loaded.data
    total = sum(m["seconds"] for m in loaded.metrics)
    lines = [
        f"**{loaded.name}** ({loaded.architecture}, {loaded.parameters:,} parameters, start weights "
        f"{loaded.start_weights}, input {loaded.preprocessing.input_size}x{loaded.preprocessing.input_size}, "
        f"optimizer {args.get('optimizer')} lr {args.get('lr')} batch {args.get('batch_size')}, "
        f"{data.get('train_samples')} train / {data.get('test_samples')} test images): "
        f"{len(loaded.metrics)} epochs in {total / 60:.1f} min on {args.get('machine', 'the CPU')}; train figures "
        + ("from the training batches as they ran (`--train-metrics running`)" if args.get("train_metrics") == "running"
           else "from an eval-mode pass over the whole train split"),
        "",
        "| epoch | train loss | train acc | test loss | test acc | seconds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in loaded.metrics:
        lines.append(f"| {m['epoch']} | {m['train_loss']:.4f} | {100 * m['train_accuracy']:.2f}% | "
                     f"{m['test_loss']:.4f} | {100 * m['test_accuracy']:.2f}% | {m['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    for path in parser.parse_args().checkpoints:
        print(markdown_table(path) + "\n")


if __name__ == "__main__":
    main()
