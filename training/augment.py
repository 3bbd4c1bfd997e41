"""Augmentation on normalised float batches, on whatever device the batch lives (GPU when there).

No horizontal flips: GTSRB has mirror-image classes ("turn left ahead" vs "turn right ahead").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, max_rotate_deg: float = 10.0, max_scale: float = 0.1,
                  max_translate: float = 0.1) -> torch.Tensor:
    """Per-sample small rotation, zoom and shift: real signs are seen off-axis and off-centre."""
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(max_rotate_deg)
    scale = 1 + (torch.rand(n, device=x.device) * 2 - 1) * max_scale
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * max_translate * 2  # grid units span [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_photometric(x: torch.Tensor, brightness: float = 0.3, contrast: float = 0.3) -> torch.Tensor:
    """Per-sample brightness shift and contrast scale: GTSRB spans dusk to glare."""
    n = x.shape[0]
    c = 1 + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2 - 1) * contrast
    b = (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2 - 1) * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean + b


def random_erasing(x: torch.Tensor, p: float, area: tuple[float, float] = (0.02, 0.25),
                   aspect: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """With probability p per sample, one rectangle of random area and aspect ratio filled with noise
    (Random Erasing, Zhong et al. 2017): GTSRB's test tracks include signs partly covered by stickers
    and by objects in front of them, which a model that never saw occlusion reads as another sign."""
    n, _, h, w = x.shape
    fraction = torch.empty(n, device=x.device).uniform_(*area)
    ratio = torch.empty(n, device=x.device).uniform_(math.log(aspect[0]), math.log(aspect[1])).exp()
    height = (torch.sqrt(fraction * ratio) * h).clamp(1, h)
    width = (torch.sqrt(fraction / ratio) * w).clamp(1, w)
    top = torch.rand(n, device=x.device) * (h - height)
    left = torch.rand(n, device=x.device) * (w - width)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + height).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + width).view(n, 1, 1))
              & (torch.rand(n, 1, 1, device=x.device) < p))
    return torch.where(inside.unsqueeze(1), torch.randn_like(x), x)


def augment(x: torch.Tensor, erase_prob: float = 0.0) -> torch.Tensor:
    x = random_photometric(random_affine(x))
    return random_erasing(x, erase_prob) if erase_prob > 0 else x
