"""Training crops for the detector: random windows of GTSDB frames, rescaled, flipped, recoloured,
with GTSRB signs pasted in, and their heat-map targets.

Why each trick:
- crops, not frames: a 256 px window costs 1/17 of a frame, and most of a frame is road and sky;
  half the windows are centred near a sign so that the ~700 training signs are seen often;
- scale jitter (0.5-2x, log-uniform): the same sign appears at 17 to 128 px as the car approaches,
  and a photo taken closer shows it bigger still; each look of the inference pyramid
  (models.detector.PYRAMID, factors 3 apart) must cover a 3x range of sizes with room to spare;
- windows centred on hard negatives (training.hard_negatives: what an earlier detector proposed where
  no sign is) for a share of the draws: the blue windows and red lights that cost precision are rare
  in random windows;
- horizontal flips: a group (round red, triangle, round blue, other) is unchanged by a mirror;
- GTSRB signs (12-128 px) pasted onto the windows: 43 classes in thousands of lightings, where GTSDB's training
  frames hold only ~700 signs, most of a handful of classes.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.detector import STRIDE, group_of
from models.gtsdb import Frame

SCALE_RANGE = (0.5, 2.0)  # window rescale factors, drawn log-uniform
PASTE_WIDTHS = (12.0, 128.0)  # pasted GTSRB signs' widths in window pixels, drawn log-uniform


@dataclass
class PasteSign:
    pixels: torch.Tensor  # uint8 [3, h, w], the whole GTSRB crop (sign plus its ~10 % margin)
    roi: tuple[int, int, int, int]  # the sign inside it: x1, y1, x2, y2 (exclusive)
    class_id: int


def load_paste_signs(root: str, count: int, seed: int = 0) -> list[PasteSign]:
    """`count` GTSRB training crops drawn at random over all classes, with their sign boxes from the
    per-class CSV files (in the stored image's pixels)."""
    folder = Path(root) / "gtsrb" / "GTSRB" / "Training"
    if not folder.is_dir():
        raise FileNotFoundError(f"no GTSRB training images under {folder}; set --data-root")
    rows = []
    for table in sorted(folder.glob("*/GT-*.csv")):
        with open(table, newline="") as f:
            rows += [(table.parent / r["Filename"], r) for r in csv.DictReader(f, delimiter=";")
                     if (table.parent / r["Filename"]).is_file()]
    random.Random(seed).shuffle(rows)
    signs = []
    for path, r in rows[:count]:
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())
        roi = (int(r["Roi.X1"]), int(r["Roi.Y1"]), int(r["Roi.X2"]) + 1, int(r["Roi.Y2"]) + 1)
        signs.append(PasteSign(pixels, roi, int(r["ClassId"])))
    return signs


def sign_sigma(w: float, h: float) -> float:
    """Gaussian spread of a sign's centre peak, in output cells: wider for bigger signs, whose
    centre is less sharply defined (about CenterNet's IoU-0.7 radius / 3 for square boxes)."""
    return max(0.5, 0.1 * math.sqrt(w * h) / STRIDE)


def make_targets(boxes: list[tuple[float, float, float, float]], groups: list[int], num_groups: int,
                 height: int, width: int) -> dict[str, torch.Tensor]:
    """Targets on the stride-4 grid of a `height` x `width` input: per-group Gaussian heat maps
    peaking at 1 on each centre cell, and at the centre cells the log size and sub-cell offset."""
    h, w = height // STRIDE, width // STRIDE
    heat = torch.zeros(num_groups, h, w)
    size = torch.zeros(2, h, w)
    offset = torch.zeros(2, h, w)
    mask = torch.zeros(h, w)
    for (x1, y1, x2, y2), g in zip(boxes, groups):
        bw, bh = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
        ix, iy = int(cx), int(cy)
        if not (0 <= ix < w and 0 <= iy < h) or bw < 2 or bh < 2:
            continue
        sigma = sign_sigma(bw, bh)
        r = int(3 * sigma) + 1  # beyond 3 sigma the Gaussian is < 1 %: only a local window is drawn
        top, bottom, left, right = max(0, iy - r), min(h, iy + r + 1), max(0, ix - r), min(w, ix + r + 1)
        ys = torch.arange(top, bottom, dtype=torch.float32).view(-1, 1) - iy
        xs = torch.arange(left, right, dtype=torch.float32).view(1, -1) - ix
        gauss = torch.exp(-(xs ** 2 + ys ** 2) / (2 * sigma ** 2))
        heat[g, top:bottom, left:right] = torch.maximum(heat[g, top:bottom, left:right], gauss)
        size[0, iy, ix], size[1, iy, ix] = math.log(bw / STRIDE), math.log(bh / STRIDE)
        offset[0, iy, ix], offset[1, iy, ix] = cx - ix, cy - iy
        mask[iy, ix] = 1.0
    return {"heat": heat, "size": size, "offset": offset, "mask": mask}


class CropSampler:
    """Draws augmented training windows from in-memory frames; all randomness from one generator."""

    def __init__(self, frames: list[Frame], pixels: list[torch.Tensor], paste: list[PasteSign], *,
                 crop: int = 256, scale: tuple[float, float] = SCALE_RANGE, near_sign: float = 0.5,
                 paste_probability: float = 0.5, max_pastes: int = 3, num_groups: int = 4, seed: int = 0,
                 paste_widths: tuple[float, float] = PASTE_WIDTHS, hard_negatives: Sequence[dict] = (),
                 hard_probability: float = 0.0):
        self.frames, self.pixels, self.paste = frames, pixels, paste
        self.crop, self.scale, self.near_sign = crop, scale, near_sign
        self.paste_probability, self.max_pastes, self.num_groups = paste_probability, max_pastes, num_groups
        self.paste_widths = paste_widths
        self.rng = random.Random(seed)
        self.with_signs = [i for i, f in enumerate(frames) if f.signs]
        index = {f.name: i for i, f in enumerate(frames)}
        self.hard = [(index[h["frame"]], tuple(h["box"])) for h in hard_negatives if h["frame"] in index]
        self.hard_probability = hard_probability if self.hard else 0.0

    def state_dict(self) -> dict:
        return {"rng": list(self.rng.getstate()[1]), "rng_pos": self.rng.getstate()[2]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((3, tuple(state["rng"]), state["rng_pos"]))

    def batch(self, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        crops, targets = zip(*(self.sample() for _ in range(n)))
        return torch.stack(crops), {k: torch.stack([t[k] for t in targets]) for k in targets[0]}

    def sample(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng, out = self.rng, self.crop
        draw = rng.random()
        near = bool(self.with_signs) and draw < self.near_sign
        hard = not near and draw < self.near_sign + self.hard_probability
        if hard:
            index, centre_box = rng.choice(self.hard)
        else:
            index = rng.choice(self.with_signs) if near else rng.randrange(len(self.frames))
            centre_box = rng.choice(self.frames[index].signs).box if near else None
        frame, pixels = self.frames[index], self.pixels[index]
        _, fh, fw = pixels.shape
        s = math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        side = min(int(round(out / s)), fh, fw)  # the window in frame pixels, rescaled to `out`
        if centre_box is not None:
            cx, cy = (centre_box[0] + centre_box[2]) / 2, (centre_box[1] + centre_box[3]) / 2
            left = int(cx - rng.uniform(0.15, 0.85) * side)
            top = int(cy - rng.uniform(0.15, 0.85) * side)
        else:
            left, top = rng.randrange(fw - side + 1), rng.randrange(fh - side + 1)
        left, top = min(max(0, left), fw - side), min(max(0, top), fh - side)
        window = pixels[:, top:top + side, left:left + side].float().unsqueeze(0)
        image = F.interpolate(window, size=(out, out), mode="bilinear", antialias=side > out,
                              align_corners=False)[0]
        k = out / side
        boxes, groups = [], []
        for sign in frame.signs:
            x1, y1, x2, y2 = ((sign.box[0] - left) * k, (sign.box[1] - top) * k,
                              (sign.box[2] - left) * k, (sign.box[3] - top) * k)
            if 0 <= (x1 + x2) / 2 < out and 0 <= (y1 + y2) / 2 < out:
                boxes.append((max(0.0, x1), max(0.0, y1), min(float(out), x2), min(float(out), y2)))
                groups.append(group_of(sign.class_id))
        if self.paste and rng.random() < self.paste_probability:
            for _ in range(rng.randint(1, self.max_pastes)):
                self._paste(image, boxes, groups)
        if rng.random() < 0.5:
            image = image.flip(-1)
            boxes = [(out - x2, y1, out - x1, y2) for x1, y1, x2, y2 in boxes]
        # brightness and contrast jitter: dusk, glare and the camera's exposure differ between drives
        mean = image.mean()
        image = (image - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.6, 1.4)
        image = image.clamp(0, 255).round().to(torch.uint8)
        return image, make_targets(boxes, groups, self.num_groups, out, out)

    def _paste(self, image: torch.Tensor, boxes: list, groups: list) -> None:
        """Paste one GTSRB crop, its sign `paste_widths` px wide (log-uniform: small signs are the hard
        ones, and the large ones are the close-ups a phone takes, as blurry when enlarged as GTSRB's
        small crops are), where it overlaps no existing sign."""
        rng, out = self.rng, self.crop
        sign = rng.choice(self.paste)
        x1, y1, x2, y2 = sign.roi
        width = math.exp(rng.uniform(math.log(self.paste_widths[0]), math.log(self.paste_widths[1])))
        k = width / (x2 - x1)
        _, h, w = sign.pixels.shape
        ph, pw = max(2, int(round(h * k))), max(2, int(round(w * k)))
        if ph >= out or pw >= out:
            return
        top, left = rng.randrange(out - ph), rng.randrange(out - pw)
        box = (left + x1 * k, top + y1 * k, left + x2 * k, top + y2 * k)
        pad = 4  # keep pasted signs apart from each other and from real ones
        if any(b[0] - pad < box[2] and box[0] < b[2] + pad and b[1] - pad < box[3] and box[1] < b[3] + pad
               for b in boxes):
            return
        patch = F.interpolate(sign.pixels.float().unsqueeze(0), size=(ph, pw), mode="bilinear",
                              antialias=k < 1, align_corners=False)[0]
        # feather the patch's rim over 2 px so its edge is not a sharp rectangle the network could key on
        ramp_y = torch.clamp(torch.minimum(torch.arange(ph), torch.arange(ph).flip(0)).float() / 2, max=1)
        ramp_x = torch.clamp(torch.minimum(torch.arange(pw), torch.arange(pw).flip(0)).float() / 2, max=1)
        alpha = (ramp_y.view(-1, 1) * ramp_x.view(1, -1)).unsqueeze(0)
        region = image[:, top:top + ph, left:left + pw]
        image[:, top:top + ph, left:left + pw] = alpha * patch + (1 - alpha) * region
        boxes.append(box)
        groups.append(group_of(sign.class_id))
