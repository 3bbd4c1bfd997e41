"""GTSRB decoded once into uint8 tensors (optionally cached on disk), so no epoch decodes an image again.

    python -m models.gtsrb --data-root ../shared/data --input-size 32      # build the caches
    python -m models.gtsrb --stats                                          # channel mean / std
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.checkpoint import atomic_save, safe_load
from models.input_sizes import DEFAULT_INPUT_SIZE
from models.paths import PROJECT_ROOT, default_data_root
from models.preprocessing import Preprocessing, image_to_uint8, normalize

DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache" / "gtsrb"
IMAGE_SUFFIXES = (".ppm", ".jpg", ".jpeg", ".png")


@dataclass
class TensorSplit:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> "TensorSplit":
        """A class-mixed random subset of n samples (all when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = subset_indices(len(self), n, seed)
        return TensorSplit(self.images[idx], self.labels[idx])


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def list_samples(root: str, split: str) -> list[tuple[str, int]]:
    """(path, class id) pairs exactly as torchvision.datasets.GTSRB(root, split) lists them: the same
    layout, files and order, read here because importing torchvision costs every process ~3.5 s."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    base = Path(root) / "gtsrb"
    folder = base / "GTSRB" / ("Training" if split == "train" else "Final_Test/Images")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no GTSRB {split} split under {root!r} (expected {root}/gtsrb/GTSRB/...). "
            "Set --data-root or GTSRB_ROOT to the folder that holds gtsrb/.")
    if split == "test":
        with open(base / "GT-final_test.csv", newline="") as f:
            return [(str(folder / row["Filename"]), int(row["ClassId"]))
                    for row in csv.DictReader(f, delimiter=";", skipinitialspace=True)]
    # torchvision's ImageFolder rule: class folders in sorted order are the class ids, the images in each
    # (the official release's .ppm, or .jpg / .png copies of it)
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    samples = []
    for class_id, name in enumerate(classes):
        for directory, _, files in sorted(os.walk(os.path.join(str(folder), name), followlinks=True)):
            samples += [(os.path.join(directory, f), class_id) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return samples


def _decode(args: tuple[str, Preprocessing]) -> np.ndarray:
    path, pre = args
    with Image.open(path) as image:
        # numpy, not torch: tensors cross process boundaries as shared-memory file descriptors
        return image_to_uint8(image, pre).numpy()


def _cache_key(samples: list[tuple[str, int]], pre: Preprocessing) -> str:
    h = hashlib.sha256(repr(pre.to_dict()).encode())
    for path, label in samples:
        h.update(f"{path}:{label}:{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def load_spread(root: str, split: str, pre: Preprocessing, n: int) -> TensorSplit:
    """n samples spread evenly over the split's listing (the training split is listed class by class,
    so every class is in it), decoded here: for a few hundred images, cheaper than the whole split."""
    samples = list_samples(root, split)
    picked = samples[::max(1, len(samples) // n)][:n]
    images = torch.from_numpy(np.stack([_decode((path, pre)) for path, _ in picked]))
    return TensorSplit(images, torch.tensor([c for _, c in picked], dtype=torch.int64))


def quantization_batches(root: str, pre: Preprocessing, n: int, batch_size: int = 64) -> list[torch.Tensor]:
    """n training images spread over all classes, normalised, in batches: what sets an int8 model's
    activation ranges (models.export.quantize_onnx)."""
    images = load_spread(root, "train", pre, n).images
    return [normalize(images[i:i + batch_size], pre) for i in range(0, len(images), batch_size)]


@torch.inference_mode()
def forward_accuracy(forward, split: TensorSplit, pre: Preprocessing, batch_size: int = 256) -> float:
    """Top-1 accuracy over `split` of any forward on the normalised batch (a module, or a backend's
    forward); for a pair of outputs (CalibratedClassifier's) the first holds the class scores."""
    correct = 0
    for i in range(0, len(split), batch_size):
        out = forward(normalize(split.images[i:i + batch_size], pre))
        scores = out[0] if isinstance(out, (tuple, list)) else out
        correct += int((scores.argmax(1) == split.labels[i:i + batch_size]).sum())
    return correct / len(split)


def load_split(root: str, split: str, pre: Preprocessing, cache_dir: Path | None = DEFAULT_CACHE_DIR,
               workers: int | None = None, n: int | None = None, seed: int = 0) -> TensorSplit:
    """Decode a whole split with the shared preprocessing; reuse the on-disk cache when it matches.
    With `n`, the same samples as `load_split(...).subset(n, seed)`, decoding only those."""
    samples = list_samples(root, split)
    if n is not None and n < len(samples):
        return _decode_split([samples[i] for i in subset_indices(len(samples), n, seed).tolist()], pre, workers)
    if cache_dir is None:
        return _decode_split(samples, pre, workers)
    cache = Path(cache_dir) / f"{split}-{pre.input_size}-{_cache_key(samples, pre)}.pt"
    with _exclusive(cache.with_suffix(".lock")):  # processes that start together (torchrun's ranks) decode once
        if cache.is_file():
            blob = safe_load(cache)
            return TensorSplit(blob["images"], blob["labels"])
        decoded = _decode_split(samples, pre, workers)
        atomic_save({"images": decoded.images, "labels": decoded.labels}, cache)
    return decoded


def _decode_split(samples: list[tuple[str, int]], pre: Preprocessing, workers: int | None) -> TensorSplit:
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(p, pre) for p, _ in samples]
    with ProcessPoolExecutor(workers) as pool:
        images = torch.from_numpy(np.stack(list(pool.map(_decode, jobs, chunksize=256))))
    return TensorSplit(images, torch.tensor([c for _, c in samples], dtype=torch.int64))


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock on lock_path for the block (none where the folder cannot be written)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE["cnn"])
    parser.add_argument("--stats", action="store_true", help="print the train split's channel mean and std")
    args = parser.parse_args()
    pre = Preprocessing(input_size=args.input_size)
    for split in ("train", "test"):
        data = load_split(args.data_root, split, pre)
        print(f"{split}: {tuple(data.images.shape)} images, {int(data.labels.max()) + 1} classes")
        if args.stats and split == "train":
            x = data.images.float() / 255
            print("mean", [round(v, 4) for v in x.mean((0, 2, 3)).tolist()],
                  "std", [round(v, 4) for v in x.std((0, 2, 3)).tolist()])


if __name__ == "__main__":
    main()
