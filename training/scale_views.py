"""Photos a dashcam never takes, made from the real data: the views behind `evaluate_detection --zooms`
and `--close-ups`.

- A zoom view: a window of a GTSDB frame around one sign, scaled back to the frame's size, so every
  sign in it looks `zoom` times bigger (a photo taken closer, or with a longer lens).
- A close-up: one GTSRB test image (a sign with its ~10 % margin) enlarged to a square photo, the
  picture of a single sign a phone takes; or the test image as stored, a small crop.

Both are deterministic (the sign's place in a zoom window comes from a seeded generator), so the
figures they give can be rerun by anyone.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from models.gtsdb import FRAME_SIZE, Frame, Sign

CLOSE_UP_SIDE = 600  # pixels of a close-up photo's side
ZOOMS = (1, 2, 3, 4)


@dataclass(frozen=True)
class View:
    image: Image.Image
    signs: list[Sign]  # every sign whose centre lies in the view, in its pixels (clipped)
    target: Sign  # the sign the view was made around


def zoom_window(box: tuple[float, float, float, float], zoom: float, rng: random.Random,
                frame_size: tuple[int, int] = FRAME_SIZE) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) window of a frame, 1/zoom of its width and height, holding `box`
    with the box's centre at a random place in the window's central 60 %."""
    fw, fh = frame_size
    ww, wh = fw / zoom, fh / zoom
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    left = min(max(0.0, cx - rng.uniform(0.2, 0.8) * ww), fw - ww)
    top = min(max(0.0, cy - rng.uniform(0.2, 0.8) * wh), fh - wh)
    return left, top, left + ww, top + wh


def zoom_view(image: Image.Image, frame: Frame, target: Sign, zoom: float, rng: random.Random) -> View:
    """The frame's window around `target` at `zoom`, resized to the frame's size."""
    window = zoom_window(target.box, zoom, rng, image.size)
    left, top, right, bottom = window
    k = image.width / (right - left)
    view = image.resize(image.size, Image.Resampling.BILINEAR, box=window)

    def mapped(sign: Sign) -> Sign:
        x1, y1, x2, y2 = ((sign.box[0] - left) * k, (sign.box[1] - top) * k,
                          (sign.box[2] - left) * k, (sign.box[3] - top) * k)
        return Sign((max(0.0, x1), max(0.0, y1), min(float(view.width), x2), min(float(view.height), y2)),
                    sign.class_id)

    inside = [s for s in frame.signs
              if left <= (s.box[0] + s.box[2]) / 2 < right and top <= (s.box[1] + s.box[3]) / 2 < bottom]
    return View(view, [mapped(s) for s in inside], mapped(target))


def zoom_views(frames: list[Frame], folder: Path, zoom: float, seed: int = 0):
    """One zoom view per sign of `frames` (images in `folder`), in frame order."""
    rng = random.Random(seed)
    for frame in frames:
        if not frame.signs:
            continue
        with Image.open(folder / frame.name) as opened:
            image = opened.convert("RGB")
        for sign in frame.signs:
            yield zoom_view(image, frame, sign, zoom, rng)


@dataclass(frozen=True)
class TestCrop:
    path: Path
    roi: tuple[int, int, int, int]  # the sign: x1, y1, x2, y2 (exclusive) in the stored image's pixels
    class_id: int


def gtsrb_test_crops(root: str | Path, count: int, seed: int = 0) -> list[TestCrop]:
    """`count` GTSRB test images drawn at random (seeded), with their sign boxes from GT-final_test.csv."""
    table = Path(root) / "gtsrb" / "GT-final_test.csv"
    folder = Path(root) / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    if not table.is_file():
        raise FileNotFoundError(f"no GTSRB test table at {table}; set --data-root or GTSRB_ROOT")
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter=";") if (folder / r["Filename"]).is_file()]
    rows = random.Random(seed).sample(rows, min(count, len(rows)))
    return [TestCrop(folder / r["Filename"], (int(r["Roi.X1"]), int(r["Roi.Y1"]), int(r["Roi.X2"]) + 1,
                                              int(r["Roi.Y2"]) + 1), int(r["ClassId"])) for r in rows]


def close_up(crop: TestCrop, side: int | None = CLOSE_UP_SIDE) -> View:
    """The test image enlarged to a `side` x `side` photo, the sign's box scaled with it (None: the
    image as stored, a crop of 15-96 px such as a user may drop on the page)."""
    with Image.open(crop.path) as opened:
        image = opened.convert("RGB")
    side_x, side_y = (side, side) if side else image.size
    kx, ky = side_x / image.width, side_y / image.height
    x1, y1, x2, y2 = crop.roi
    sign = Sign((x1 * kx, y1 * ky, x2 * kx, y2 * ky), crop.class_id)
    return View(image if not side else image.resize((side, side), Image.Resampling.BICUBIC), [sign], sign)
