"""GTSDB street frames and their boxes, decoded once into uint8 tensors kept in memory.

    <root>/gtsdb/gt.txt           <file>;<left>;<top>;<right>;<bottom>;<class id>  (inclusive pixels)
    <root>/gtsdb/images/NNNNN.jpg

Frames of one drive follow each other, so validation takes a contiguous block of frame numbers
(`VAL_FRAMES`), never random frames.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.checkpoint import atomic_save, safe_load
from models.paths import PROJECT_ROOT

FRAME_SIZE = (1360, 800)  # every GTSDB frame's (width, height)
VAL_FRAMES = range(500, 600)  # 00500-00599: the last drive segment of the 600 training frames
DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache" / "gtsdb"


@dataclass(frozen=True)
class Sign:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, continuous (right/bottom exclusive)
    class_id: int


@dataclass
class Frame:
    name: str
    signs: list[Sign]


def read_ground_truth(root: str | os.PathLike) -> list[Frame]:
    """Every frame of <root>/gtsdb/images (frames without signs included), with its signs."""
    folder = Path(root) / "gtsdb"
    gt, images = folder / "gt.txt", folder / "images"
    if not gt.is_file() or not images.is_dir():
        raise FileNotFoundError(f"no GTSDB data under {folder} (expected gt.txt and images/); "
                                "set --data-root or GTSRB_ROOT to the folder that holds gtsdb/")
    frames = {p.name: Frame(p.name, []) for p in sorted(images.glob("*.jpg"))}
    for line in gt.read_text().splitlines():
        if not line.strip():
            continue
        name, left, top, right, bottom, class_id = line.strip().split(";")
        name = name.replace(".ppm", ".jpg")
        if name in frames:
            # inclusive pixel indices -> continuous coordinates: the box covers [left, right + 1)
            frames[name].signs.append(Sign((float(left), float(top), float(right) + 1, float(bottom) + 1),
                                           int(class_id)))
    return list(frames.values())


def frame_number(name: str) -> int:
    return int(Path(name).stem)


def split_frames(frames: list[Frame], split: str) -> list[Frame]:
    """`train`: every frame outside VAL_FRAMES; `val`: the frames inside; `all`: every frame."""
    if split == "all":
        return frames
    inside = [f for f in frames if frame_number(f.name) in VAL_FRAMES]
    return inside if split == "val" else [f for f in frames if frame_number(f.name) not in VAL_FRAMES]


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


def load_frames(root: str | os.PathLike, frames: list[Frame],
                cache_dir: Path | None = DEFAULT_CACHE_DIR) -> list[torch.Tensor]:
    """The frames' pixels, uint8 [3, H, W] each, cached on disk as one tensor file per split."""
    cache = None
    if cache_dir is not None and frames:
        key = f"{frames[0].name}-{frames[-1].name}-{len(frames)}"
        cache = Path(cache_dir) / f"frames-{key}.pt"
        if cache.is_file():
            return list(safe_load(cache)["frames"])
    folder = Path(root) / "gtsdb" / "images"
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # PIL releases the GIL in decode
        pixels = [torch.from_numpy(a) for a in pool.map(_decode, (folder / f.name for f in frames))]
    if cache is not None:
        atomic_save({"frames": pixels}, cache)
    return pixels
