"""The scene pipeline (models.scene.name_signs) over many frames, in this process, on every core.

The detector and the classifier are served checkpoints on the runtime the service would choose for
them (app.engine.choose_backend, the same cache), run by their kinds' handlers with all the cores'
threads. Frames go through in chunks; the next chunk decodes in a thread while this one is detected.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from app.engine import choose_backend
from app.kinds import kind_of
from app.kinds.base import Handler
from app.schemas.detect import Sign
from app.settings import Settings
from batch.frames import Frame
from models.checkpoint import LoadedModel, load_checkpoint, served_checkpoints
from models.scene import name_signs, score_threshold

log = logging.getLogger("signserve")

CHUNK = 8  # frames per step: two detector batches, enough crops to fill a classifier batch


@dataclass
class Models:
    detector: LoadedModel
    classifier: LoadedModel
    find: Handler
    name: Handler
    max_batch_size: int

    @property
    def runtimes(self) -> dict[str, str]:
        return {self.detector.name: self.find.backend, self.classifier.name: self.name.backend}


def load_models(checkpoint_dir: Path, classifier: str | None, backend: str, threads: int) -> Models:
    """The first detector in `checkpoint_dir` and `classifier` (default: as /v1/detect, the box-naming
    classifier with the highest test accuracy), each on its chosen runtime."""
    loaded = [load_checkpoint(p, name=p.stem) for p in served_checkpoints(checkpoint_dir)]
    detectors = [m for m in loaded if kind_of(m).finds_boxes]
    namers = {m.name: m for m in loaded if kind_of(m).names_boxes}
    if not detectors:
        raise SystemExit(f"no detector checkpoint in {checkpoint_dir} (train one: make train MODEL=detector)")
    if classifier is not None and classifier not in namers:
        raise SystemExit(f"--classifier {classifier!r} is not a classifier in {checkpoint_dir}; "
                         f"one of: {', '.join(namers) or 'none'}")
    if not namers:
        raise SystemExit(f"no classifier checkpoint in {checkpoint_dir} to name the boxes")
    namer = namers[classifier] if classifier else max(namers.values(), key=lambda m: m.test_accuracy or 0.0)
    settings = Settings(checkpoint_dir=checkpoint_dir)
    handlers = []
    for model in (detectors[0], namer):
        record = choose_backend(model, backend, cache_dir=settings.backend_cache_dir,
                                batch_size=settings.max_batch_size, parity_images=settings.backend_parity_images,
                                threads=threads, half=settings.half)
        handlers.append(kind_of(model).handler(model, half=settings.half, backend=record, threads=threads))
    return Models(detectors[0], namer, *handlers, max_batch_size=settings.max_batch_size)


def answer(models: Models, frames: list[Frame], min_score: float | None) -> list[list[dict]]:
    """Per frame that decoded, its signs as /v1/detect answers them."""
    detector, classifier = models.detector, models.classifier
    batching = kind_of(detector).batching(detector, models.max_batch_size, 1)

    async def find(items: list[torch.Tensor]) -> list:
        out: list = []
        for i in range(0, len(items), batching.max_batch_size):
            out += models.find.run(batching.collate(items[i:i + batching.max_batch_size]))
        return out

    async def name(crops: list[torch.Tensor]) -> list:
        out: list = []
        for i in range(0, len(crops), models.max_batch_size):
            out += models.name.run(torch.stack(crops[i:i + models.max_batch_size]))
        return out

    found = asyncio.run(name_signs([f.scene for f in frames], find, name, detector_pre=detector.preprocessing,
                                   classifier_pre=classifier.preprocessing,
                                   rule=classifier.calibration.rule,
                                   min_score=score_threshold(detector) if min_score is None else min_score))
    return [[Sign.of(s, classifier.class_names).model_dump() for s in signs] for signs in found]


def chunks(frames: Iterator[Frame], size: int = CHUNK) -> Iterator[list[Frame]]:
    """`frames` in lists of `size`, the next list read (decoded) in a thread while the caller works."""
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        pending = pool.submit(lambda: list(islice(frames, size)))
        while True:
            chunk = pending.result()
            if not chunk:
                return
            pending = pool.submit(lambda: list(islice(frames, size)))
            yield chunk


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
