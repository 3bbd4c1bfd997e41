"""The images calibration is fitted and checked on, each as uint8 tensors in a checkpoint's preprocessing.

- GTSRB training tracks held out by track (`track_split`): every image of one physical sign lands
  on the same side;
- GTSDB sign crops (`gtsdb_sign_crops`): each boxed sign of some frames, cut with GTSRB's ~10 %
  margin. Neither classifier was trained on GTSDB, so these are real labelled images it never saw;
- GTSDB background patches (`gtsdb_background_patches`): squares of 24-128 px (log-uniform sides)
  cut from frames at random, away from every boxed sign: sky, road, walls, cars, and the signs of
  other kinds that GTSDB does not box.

Frames 00000-00499 are for fitting, 00500-00599 for validation (the block the detector also holds out).
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from models.preprocessing import Preprocessing, image_to_uint8

FIT_FRAMES = range(0, 500)
VALIDATION_FRAMES = range(500, 600)
PATCH_SIDES = (24, 128)
CROP_MARGIN = 0.1  # GTSRB crops keep ~10 % of the sign's size around it
_TRACK = re.compile(r"(\d{5})_\d{5}\.(?:ppm|jpe?g|png)$", re.IGNORECASE)


def track_of(path: str) -> str:
    """GTSRB training files are <class>/<track>_<frame>.<ext>; a track is one physical sign."""
    match = _TRACK.search(path)
    if match is None:
        raise ValueError(f"not a GTSRB training file name: {path}")
    return f"{Path(path).parent.name}/{match.group(1)}"


def track_split(paths: list[str], fraction: float = 0.2, seed: int = 0) -> torch.Tensor:
    """A boolean mask over `paths`: True for the images of about `fraction` of each class's tracks."""
    tracks_by_class: dict[str, set[str]] = defaultdict(set)
    for p in paths:
        t = track_of(p)
        tracks_by_class[t.split("/")[0]].add(t)
    rng = random.Random(seed)
    held: set[str] = set()
    for cls in sorted(tracks_by_class):
        tracks = sorted(tracks_by_class[cls])
        held.update(rng.sample(tracks, max(1, round(fraction * len(tracks)))))
    return torch.tensor([track_of(p) in held for p in paths])


@dataclass(frozen=True)
class Box:
    frame: int
    left: int
    top: int
    right: int
    bottom: int
    class_id: int


def read_gt(gtsdb_root: str | Path) -> list[Box]:
    boxes = []
    for line in (Path(gtsdb_root) / "gt.txt").read_text().splitlines():
        if line.strip():
            name, *numbers = line.strip().split(";")
            boxes.append(Box(int(Path(name).stem), *(int(v) for v in numbers)))
    return boxes


def _frame(gtsdb_root: str | Path, frame: int) -> Image.Image:
    with Image.open(Path(gtsdb_root) / "images" / f"{frame:05d}.jpg") as image:
        return image.convert("RGB")


def gtsdb_sign_crops(gtsdb_root: str | Path, frames: range, pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 3, S, S], class ids [N]): every boxed sign of `frames`, with a GTSRB-like margin."""
    by_frame: dict[int, list[Box]] = defaultdict(list)
    for box in read_gt(gtsdb_root):
        if box.frame in frames:
            by_frame[box.frame].append(box)
    images, labels = [], []
    for frame in sorted(by_frame):
        image = _frame(gtsdb_root, frame)
        for b in by_frame[frame]:
            mx = max(1, round(CROP_MARGIN * (b.right - b.left + 1)))
            my = max(1, round(CROP_MARGIN * (b.bottom - b.top + 1)))
            crop = image.crop((max(0, b.left - mx), max(0, b.top - my),
                               min(image.width, b.right + 1 + mx), min(image.height, b.bottom + 1 + my)))
            images.append(image_to_uint8(crop, pre))
            labels.append(b.class_id)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _overlaps(x: int, y: int, side: int, boxes: list[Box], margin: float) -> bool:
    for b in boxes:
        mx, my = margin * (b.right - b.left + 1), margin * (b.bottom - b.top + 1)
        if x < b.right + 1 + mx and x + side > b.left - mx and y < b.bottom + 1 + my and y + side > b.top - my:
            return True
    return False


def background_squares(gtsdb_root: str | Path, frames: range, per_frame: int, seed: int = 0,
                       sides: tuple[int, int] = PATCH_SIDES) -> list[tuple[int, int, int, int]]:
    """(frame, left, top, side) of `per_frame` random squares per frame that touch no boxed sign
    (nor a margin of a quarter of its size around it); sides log-uniform in `sides`."""
    boxes: dict[int, list[Box]] = defaultdict(list)
    for box in read_gt(gtsdb_root):
        boxes[box.frame].append(box)
    rng = random.Random(seed)
    squares = []
    for frame in frames:
        with Image.open(Path(gtsdb_root) / "images" / f"{frame:05d}.jpg") as image:
            width, height = image.size
        taken = tries = 0
        while taken < per_frame and tries < 100 * per_frame:
            tries += 1
            side = round(math.exp(rng.uniform(math.log(sides[0]), math.log(sides[1]))))
            x, y = rng.randrange(0, width - side), rng.randrange(0, height - side)
            if not _overlaps(x, y, side, boxes[frame], margin=0.25):
                squares.append((frame, x, y, side))
                taken += 1
    return squares


def background_images(gtsdb_root: str | Path, squares: list[tuple[int, int, int, int]]) -> list[Image.Image]:
    """The squares cut from their frames, at full resolution."""
    out, image, current = [], None, None
    for frame, x, y, side in squares:
        if frame != current:
            image, current = _frame(gtsdb_root, frame), frame
        out.append(image.crop((x, y, x + side, y + side)))
    return out


def gtsdb_background_patches(gtsdb_root: str | Path, frames: range, per_frame: int, pre: Preprocessing,
                             seed: int = 0, sides: tuple[int, int] = PATCH_SIDES) -> torch.Tensor:
    """uint8 [N, 3, S, S]: the background squares of `frames` in the preprocessing `pre`."""
    squares = background_squares(gtsdb_root, frames, per_frame, seed, sides)
    return torch.stack([image_to_uint8(patch, pre) for patch in background_images(gtsdb_root, squares)])


def hard_negative_crops(gtsdb_root: str | Path, negatives: list[dict], frames: range, pre: Preprocessing) -> torch.Tensor:
    """uint8 [N, 3, S, S]: the mined boxes (training.hard_negatives) of `frames`, cut as the service cuts
    a detector's box for its classifier (models.detector.crop_box), so the gate learns to reject what
    the detector actually proposes where no sign is."""
    from models.detector import crop_box

    by_frame: dict[int, list[dict]] = defaultdict(list)
    for negative in negatives:
        frame = int(Path(negative["frame"]).stem)
        if frame in frames:
            by_frame[frame].append(negative)
    crops = []
    for frame in sorted(by_frame):
        image = _frame(gtsdb_root, frame)
        crops += [image_to_uint8(image.crop(crop_box(tuple(n["box"]), image.width, image.height)), pre)
                  for n in by_frame[frame]]
    return torch.stack(crops) if crops else torch.zeros(0, 3, pre.input_size, pre.input_size, dtype=torch.uint8)
