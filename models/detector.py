"""The street-scene detector: a heat-map network that finds sign centres and sizes in whole frames.

It answers *where* the signs are and which of the four GTSDB shape/colour groups each belongs to;
the 43-way classifiers then name every box from a crop (`crop_box`), as they were trained to.

Design (CenterNet, Zhou et al. 2019, shrunk for 2 CPU cores):
- a plain conv-BN-ReLU encoder to stride 32 (a 128 px sign needs a unit that sees all of it) with a
  top-down path back to stride 4 (a 17 px sign still covers 4x4 output cells);
- per output cell: one heat-map channel per group (is a sign centred here?), the box's log width and
  height, and the centre's sub-cell offset. No anchors, no NMS needed beyond a 3x3 peak test.
- fully convolutional: any frame size works; the input is padded to a multiple of 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The benchmark's shape/colour groups (GTSDB README); class ids are GTSRB's.
GROUPS: tuple[str, ...] = ("prohibitory", "danger", "mandatory", "other")
_GROUP_IDS = {
    0: (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 15, 16),
    1: (11, *range(18, 32)),
    2: tuple(range(33, 41)),
}
STRIDE = 4  # output cell size in input pixels
PAD_MULTIPLE = 32  # the encoder halves the side five times


def group_of(class_id: int) -> int:
    """GTSRB class id -> detector group index."""
    for group, ids in _GROUP_IDS.items():
        if class_id in ids:
            return group
    return 3


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SignDetector(nn.Module):
    """Frames [N, 3, H, W] (H, W multiples of 32, normalised) -> (heat logits [N, G, H/4, W/4],
    log size [N, 2, H/4, W/4] in output cells, centre offset [N, 2, H/4, W/4] in cells)."""

    def __init__(self, num_groups: int = len(GROUPS), widths: tuple[int, ...] = (16, 24, 48, 96, 128),
                 head_width: int = 24):
        super().__init__()
        w2, w4, w8, w16, w32 = widths
        # One conv per stage at strides 2 and 4, where a frame has the most positions (the cost),
        # two at the coarser strides, where the context that tells a sign from a red light is built.
        self.stem = _conv(3, w2, 2)                                  # stride 2
        self.s4 = _conv(w2, w4, 2)                                   # stride 4
        self.s8 = nn.Sequential(_conv(w4, w8, 2), _conv(w8, w8))     # stride 8
        self.s16 = nn.Sequential(_conv(w8, w16, 2), _conv(w16, w16))  # stride 16
        self.s32 = nn.Sequential(_conv(w16, w32, 2), _conv(w32, w32))  # stride 32
        # top-down: 1x1 laterals to one width, upsample and add (FPN), then one 3x3 to mix
        self.lateral = nn.ModuleList(nn.Conv2d(c, head_width, 1) for c in (w4, w8, w16, w32))
        self.fuse = _conv(head_width, head_width)
        self.heat = nn.Conv2d(head_width, num_groups, 1)
        self.size = nn.Conv2d(head_width, 2, 1)
        self.offset = nn.Conv2d(head_width, 2, 1)
        self.reset_heads()

    def reset_heads(self) -> None:
        """Small head weights and a 1 % heat prior: the focal loss otherwise spends its first steps
        pushing ~all cells of a frame (background) down from 0.5 (CenterNet's trick)."""
        for head in (self.heat, self.size, self.offset):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        nn.init.constant_(self.heat.bias, -math.log(99.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.s4(self.stem(x))
        f8 = self.s8(f4)
        f16 = self.s16(f8)
        f32 = self.s32(f16)
        y = self.lateral[3](f32)
        for lateral, f in ((self.lateral[2], f16), (self.lateral[1], f8), (self.lateral[0], f4)):
            y = lateral(f) + F.interpolate(y, size=f.shape[-2:], mode="nearest")
        y = self.fuse(y)
        return self.heat(y), self.size(y), self.offset(y)


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Zero-pad [N, C, H, W] at the bottom and right so H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the network input's pixels
    score: float
    group: int


def decode(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, *, min_score: float,
           max_detections: int = 100, nms_iou: float = 0.5) -> list[list[Detection]]:
    """Network outputs (heat as logits) -> per image, detections by falling score.

    A detection is a local maximum of a group's heat map (3x3 peak test). Two groups may both peak
    on one sign; a class-agnostic NMS keeps the stronger.
    """
    from torchvision.ops import nms

    prob = heat.sigmoid()
    peaks = prob * (prob == F.max_pool2d(prob, 3, stride=1, padding=1))
    n, groups, h, w = prob.shape
    k = min(max_detections, groups * h * w)
    scores, flat = peaks.reshape(n, -1).topk(k)
    results: list[list[Detection]] = []
    for i in range(n):
        keep = scores[i] >= min_score
        s, idx = scores[i][keep], flat[i][keep]
        g, cell = idx // (h * w), idx % (h * w)
        cy, cx = cell // w, cell % w
        ox, oy = offset[i, 0, cy, cx], offset[i, 1, cy, cx]
        bw, bh = size[i, 0, cy, cx].exp() * STRIDE, size[i, 1, cy, cx].exp() * STRIDE
        x = (cx.float() + ox) * STRIDE
        y = (cy.float() + oy) * STRIDE
        boxes = torch.stack([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], dim=1)
        order = nms(boxes, s, nms_iou) if len(s) else torch.zeros(0, dtype=torch.long)
        results.append([Detection(tuple(boxes[j].tolist()), float(s[j]), int(g[j])) for j in order.tolist()])
    return results


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in continuous pixel coordinates."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# A classifier is shown the box widened by this share of its side on every side: GTSRB's crops
# hold the sign with a ~10 % margin, so the classifiers learned signs framed that way.
CLASSIFIER_MARGIN = 0.1


def crop_box(box: tuple[float, float, float, float], width: int, height: int,
             margin: float = CLASSIFIER_MARGIN) -> tuple[int, int, int, int]:
    """The integer (left, top, right, bottom) region a classifier sees for `box`, clipped to the image."""
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
    right, bottom = min(width, math.ceil(x2 + mx)), min(height, math.ceil(y2 + my))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def frame_batch(images: torch.Tensor, pre) -> torch.Tensor:
    """uint8 frames [N, 3, H, W] (already resized by `pre`) -> the network's float32 input, normalised
    and padded to a multiple of PAD_MULTIPLE: what an exported detector takes too."""
    from models.preprocessing import normalize

    return pad_to_multiple(normalize(images, pre))


# Boxes are found down to this score; callers keep those at or above their own min_score.
DETECTION_FLOOR = 0.05

# Heat maps and sizes are averaged over each frame and its mirror image (CenterNet's flip test): signs
# keep their group when mirrored, and the second look costs one more forward (docs/detector.md).
FLIP_TEST = True


def merge_flipped(maps: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs for [frames; mirrored frames] -> the frames' heat and size averaged with the mirrored
    ones flipped back, and the frames' own offsets (a mirrored sub-cell offset points the other way).
    Cells line up exactly: the padded width is a multiple of the stride."""
    heat, size, offset = maps
    return (heat[:n] + heat[n:].flip(-1)) / 2, (size[:n] + size[n:].flip(-1)) / 2, offset[:n]


# The frame is also looked at reduced by these factors, each look finding signs this many times
# bigger than the full frame's look can (a sign that fills the photo shrinks to the sizes training
# covers); boxes of all looks are merged by one NMS. Chosen by measurement (docs/detector.md).
PYRAMID: tuple[float, ...] = (1.0, 1 / 3, 1 / 9)
MIN_LEVEL_SIDE = 32  # a look whose shorter side would be smaller is skipped


def pyramid_levels(height: int, width: int, pyramid: tuple[float, ...] = PYRAMID) -> list[tuple[float, int, int]]:
    """(factor, height, width) of each look at a `height` x `width` frame, too-small ones left out."""
    levels = []
    for factor in pyramid:
        h, w = round(height * factor), round(width * factor)
        if min(h, w) >= MIN_LEVEL_SIDE or factor == 1.0:
            levels.append((factor, h, w))
    return levels


def merge_levels(per_level: list[tuple[float, list[Detection]]], max_detections: int,
                 nms_iou: float = 0.5) -> list[Detection]:
    """Detections of several looks at one frame (boxes in each look's pixels) -> in the frame's pixels,
    one per sign (class-agnostic NMS over all looks), by falling score."""
    from torchvision.ops import nms

    found = [Detection(tuple(v / factor for v in d.box), d.score, d.group) for factor, ds in per_level for d in ds]
    if len(per_level) == 1 or not found:
        return found[:max_detections]
    keep = nms(torch.tensor([d.box for d in found]), torch.tensor([d.score for d in found]), nms_iou)
    kept: list[Detection] = []
    for d in (found[i] for i in keep.tolist()):
        # a finer look can fire on the symbol inside a sign a coarser look found whole; signs never nest
        if not any(inside_share(d.box, k.box) >= NESTED_SHARE for k in kept):
            kept.append(d)
    return kept[:max_detections]


NESTED_SHARE = 0.7  # a box this much inside a stronger one is a part of that sign


def inside_share(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The share of box a's area that lies inside box b."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    area = (a[2] - a[0]) * (a[3] - a[1])
    return iw * ih / area if iw > 0 and ih > 0 and area > 0 else 0.0


@torch.inference_mode()
def detect(forward, images: torch.Tensor, pre, *, min_score: float, max_detections: int = 100,
           flip_test: bool = FLIP_TEST, pyramid: tuple[float, ...] = PYRAMID) -> list[list[Detection]]:
    """uint8 frames [N, 3, H, W] (already resized by `pre`) -> detections in those frames' pixels.

    `forward` is the SignDetector itself (run NHWC on its own device and dtype), or any forward that
    takes `frame_batch`'s float32 input and returns the three maps (models.backends). With `flip_test`
    the frames and their mirror images go through it as one batch of 2N (merge_flipped). Each factor
    of `pyramid` is one such look at the frames reduced by it (pyramid_levels, merge_levels)."""
    from models.preprocessing import normalize

    full = normalize(images, pre)
    per_level: list[list[tuple[float, list[Detection]]]] = [[] for _ in range(len(images))]
    for factor, h, w in pyramid_levels(*images.shape[-2:], pyramid):
        x = full if factor == 1.0 else F.interpolate(full, size=(h, w), mode="bilinear", antialias=True,
                                                      align_corners=False)
        x = pad_to_multiple(x)
        if flip_test:
            x = torch.cat([x, x.flip(-1)])
        if isinstance(forward, nn.Module):
            weight = next(forward.parameters())
            x = x.to(weight.device, weight.dtype).contiguous(memory_format=torch.channels_last)
        maps = tuple(m.float() for m in forward(x))
        heat, size, offset = merge_flipped(maps, len(images)) if flip_test else maps
        for i, found in enumerate(decode(heat, size, offset, min_score=min_score, max_detections=max_detections)):
            per_level[i].append((factor, found))
    return [merge_levels(levels, max_detections) for levels in per_level]


def classifier_crops(image, boxes: list[tuple[float, float, float, float]], pre) -> torch.Tensor:
    """The regions a classifier names, uint8 [K, 3, S, S] with its preprocessing: each box widened
    by CLASSIFIER_MARGIN, cut from the full-resolution image (PIL, EXIF orientation applied)."""
    from models.preprocessing import image_to_uint8

    if not boxes:
        return torch.zeros(0, 3, pre.input_size, pre.input_size, dtype=torch.uint8)
    return torch.stack([image_to_uint8(image.crop(crop_box(b, image.width, image.height)), pre) for b in boxes])


def pad_stack(frames: list[torch.Tensor], pre) -> torch.Tensor:
    """uint8 frames [3, H_i, W_i] -> one uint8 batch, each padded at the bottom and right with the
    mean colour (what normalisation maps to zero, like `pad_to_multiple` after it)."""
    h = max(f.shape[1] for f in frames)
    w = max(f.shape[2] for f in frames)
    if all(f.shape[1:] == (h, w) for f in frames):
        return torch.stack(frames)
    fill = torch.tensor([round(255 * m) for m in pre.mean], dtype=torch.uint8).view(3, 1, 1)
    batch = fill.expand(len(frames), 3, h, w).clone()
    for i, f in enumerate(frames):
        batch[i, :, :f.shape[1], :f.shape[2]] = f
    return batch
