"""Which GTSRB classes the shipped classifiers still get wrong on the test split, and a picture of them.

    python -m training.confusion --checkpoint models/checkpoints/cnn.pt \
        --checkpoint models/checkpoints/resnet18.pt --markdown docs/confusion.md --figure docs/confusion.png

Each checkpoint is judged with its own preprocessing (as `training.evaluate`); with two or more, their
ensemble too: the mean of their calibrated probabilities, as the service answers for `ensemble`.
The markdown lists per model the accuracy, the most common confusions (true -> predicted, count) and
the classes below 100 %; the figure shows the test images the last model listed (the ensemble, where
there is one) gets wrong, each captioned true -> predicted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.calibration import calibrated_outputs
from models.checkpoint import LoadedModel, load_checkpoint
from models.classes import CLASS_NAMES, NUM_CLASSES
from models.ensemble import ensemble_probabilities
from models.paths import default_data_root
from models.preprocessing import normalize
from models.gtsrb import TensorSplit, list_samples, load_split


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[true class, predicted class] -> count."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def top_confusions(matrix: torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """The k most frequent (true, predicted, count) with true != predicted, most frequent first (ties by
    true class, then predicted class)."""
    off = matrix.clone()
    off.fill_diagonal_(0)
    pairs = [(int(t), int(p), int(off[t, p])) for t, p in off.nonzero().tolist()]
    return sorted(pairs, key=lambda c: (-c[2], c[0], c[1]))[:k]


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Recall of each class (NaN where the split holds none of it)."""
    return matrix.diagonal().double() / matrix.sum(1).double()


@torch.inference_mode()
def calibrated_probabilities_of(loaded: LoadedModel, split: TensorSplit, batch_size: int = 500) -> torch.Tensor:
    """The served class probabilities (temperature-scaled) of every image of `split`."""
    model = loaded.model.eval().to(memory_format=torch.channels_last)
    out = []
    for i in range(0, len(split), batch_size):
        x = normalize(split.images[i:i + batch_size], loaded.preprocessing).contiguous(memory_format=torch.channels_last)
        out.append(calibrated_outputs(model, loaded.calibration, x)[0])
    return torch.cat(out)


def markdown(results: dict[str, torch.Tensor], k: int = 10) -> str:
    lines = ["| model | test accuracy | wrong | most common confusions (true -> predicted: count) |",
             "| --- | ---: | ---: | --- |"]
    for name, matrix in results.items():
        wrong = int(matrix.sum() - matrix.trace())
        pairs = "; ".join(f"{CLASS_NAMES[t]} -> {CLASS_NAMES[p]}: {n}" for t, p, n in top_confusions(matrix, 3))
        lines.append(f"| {name} | {100 * float(matrix.trace() / matrix.sum()):.2f} % | {wrong} | {pairs or '-'} |")
    for name, matrix in results.items():
        accuracy = per_class_accuracy(matrix)
        lines += ["", f"**{name}**: classes below 100 % (of {int(matrix.sum())} test images)", "",
                  "| class | test images | accuracy | taken for |", "| --- | ---: | ---: | --- |"]
        for c in sorted(range(len(accuracy)), key=lambda c: float(accuracy[c])):
            if not accuracy[c] < 1:
                continue
            taken = ", ".join(f"{CLASS_NAMES[p]} ({n})" for t, p, n in top_confusions(matrix, matrix.numel()) if t == c)
            lines.append(f"| {c} {CLASS_NAMES[c]} | {int(matrix[c].sum())} | {100 * float(accuracy[c]):.1f} % | {taken} |")
        lines += ["", f"The {k} most common confusions:", "", "| true | predicted | count |", "| --- | --- | ---: |"]
        lines += [f"| {CLASS_NAMES[t]} | {CLASS_NAMES[p]} | {n} |" for t, p, n in top_confusions(matrix, k)]
    return "\n".join(lines) + "\n"


def save_figure(paths: list[str], labels: torch.Tensor, predicted: torch.Tensor, out: Path, title: str,
                most: int = 24) -> int:
    """A grid of the misclassified test images at their stored size, captioned; returns how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    wrong = (predicted != labels).nonzero().flatten().tolist()[:most]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        with Image.open(paths[i]) as image:
            ax.imshow(image.convert("RGB"))
        ax.set_title(f"{CLASS_NAMES[int(labels[i])][:22]}\n-> {CLASS_NAMES[int(predicted[i])][:22]}", fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return len(wrong)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="repeat for several models")
    parser.add_argument("--data-root", default=default_data_root(), help="folder holding gtsrb/ (env GTSRB_ROOT)")
    parser.add_argument("--markdown", type=Path, help="write the tables here (else print them)")
    parser.add_argument("--figure", type=Path, help="write the picture of the misclassified images here")
    parser.add_argument("--max-images", type=int, default=None, help="the first N test images only (smoke runs)")
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be at least 1")

    samples = list_samples(args.data_root, "test")[:args.max_images]
    results: dict[str, torch.Tensor] = {}
    probabilities: list[torch.Tensor] = []
    labels = torch.tensor([c for _, c in samples])
    for path in args.checkpoint:
        loaded = load_checkpoint(path)
        split = load_split(args.data_root, "test", loaded.preprocessing)
        split = TensorSplit(split.images[:len(samples)], split.labels[:len(samples)])
        probabilities.append(calibrated_probabilities_of(loaded, split))
        results[loaded.name] = confusion_matrix(probabilities[-1].argmax(1), labels)
    if len(probabilities) > 1:
        results["ensemble"] = confusion_matrix(ensemble_probabilities(probabilities).argmax(1), labels)
    predicted = (ensemble_probabilities(probabilities) if len(probabilities) > 1 else probabilities[0]).argmax(1)
    command = "python -m training.confusion " + " ".join(
        [f"--checkpoint {c}" for c in args.checkpoint] + [f"--{k} {v}" for k, v in
                                                          (("markdown", args.markdown), ("figure", args.figure)) if v])
    text = (f"# Confusions on the GTSRB test split\n\nGenerated by `{command}`"
            + (f" on the first {len(samples)} test images" if args.max_images else "")
            + ".\n\n" + (f"![The test images the {list(results)[-1]} gets wrong]({args.figure.name})\n\n"
                           if args.figure else "") + markdown(results))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")
    else:
        print(text)
    if args.figure:
        name = list(results)[-1]
        shown = save_figure([p for p, _ in samples], labels, predicted, args.figure,
                            f"{name}: the test images it gets wrong (true -> predicted)")
        print(f"wrote {args.figure} ({shown} images)")
    for name, matrix in results.items():
        print(f"{name}: accuracy {float(matrix.trace() / matrix.sum()):.4f}, "
              f"top confusions {top_confusions(matrix, 3)}")


if __name__ == "__main__":
    main()
