"""The tensor augmentations the trainer applies to each batch."""

from __future__ import annotations

import torch

from training.augment import augment, random_erasing


def test_random_erasing_covers_one_rectangle_per_chosen_image():
    torch.manual_seed(0)
    x = torch.full((64, 3, 32, 32), 7.0)  # noise never lands exactly on 7.0
    out = random_erasing(x, p=1.0)
    changed = (out != x).any(dim=1)  # [N, H, W]
    for mask in changed:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        assert len(rows) and len(cols)
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # the changed pixels fill their bounding box: one rectangle
        area = box.numel() / mask.numel()
        assert 0.002 <= area <= 0.35, area
    assert (out[changed.unsqueeze(1).expand_as(out)] != 7.0).all()


def test_random_erasing_probability():
    torch.manual_seed(0)
    x = torch.zeros(2000, 3, 8, 8) + 7.0
    hit = (random_erasing(x, p=0.3) != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.25 < hit < 0.35
    assert torch.equal(random_erasing(x, p=0.0), x)


def test_augment_without_erasing_keeps_shape_and_changes_pixels():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 48, 48)
    out = augment(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert augment(x, erase_prob=0.5).shape == x.shape
