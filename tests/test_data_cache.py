"""The decoded-split cache: processes that start together (torchrun's ranks, parallel test workers)
decode a split once and read the same tensors."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import torch

import models.gtsrb as data
from models.preprocessing import Preprocessing


def tiny_gtsrb(root: Path, real_samples: list[tuple[str, int]]) -> None:
    """Two class folders of real GTSRB images in torchvision's train layout."""
    for class_id, (path, _) in enumerate(real_samples[:2]):
        folder = root / "gtsrb" / "GTSRB" / "Training" / f"{class_id:05d}"
        folder.mkdir(parents=True)
        for i in range(3):
            shutil.copy(path, folder / f"00000_{i:05d}.ppm")


def test_concurrent_loads_decode_once_and_agree(tmp_path, gtsrb_test_samples, monkeypatch):
    tiny_gtsrb(tmp_path / "data", gtsrb_test_samples)
    decodes = []
    decode = data._decode_split

    def counted(*args):
        decodes.append(threading.get_ident())
        return decode(*args)

    monkeypatch.setattr(data, "_decode_split", counted)
    pre = Preprocessing(input_size=32)
    results = [None, None]

    def load(i: int) -> None:
        results[i] = data.load_split(str(tmp_path / "data"), "train", pre, cache_dir=tmp_path / "cache", workers=1)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(decodes) == 1, decodes
    assert len(results[0]) == len(results[1]) == 6
    assert torch.equal(results[0].images, results[1].images) and torch.equal(results[0].labels, results[1].labels)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()].count(".pt") == 1
