"""The scene pipeline (models.scene.name_signs) over many frames, on every core.

The detector and the classifier are served checkpoints on the runtime the service would choose for
them (app.engine.choose_backend, the same cache), run by their kinds' handlers. Frames go through in
chunks, decoded in a thread of this process while the models work. By default the models run here
on every core's threads; with `--workers N` each of N worker processes holds its own copy on a
share of the threads and takes whole chunks, which pays only in long runs on larger machines.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
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
from models.backends import BackendRecord
from models.checkpoint import LoadedModel, load_checkpoint, served_checkpoints
from models.scene import default_namer, name_signs, scene_rule, score_threshold

log = logging.getLogger("signserve")

CHUNK = 8  # frames per step: two detector batches, enough crops to fill a classifier batch


@dataclass
class Models:
    detector: LoadedModel
    classifier: LoadedModel
    find: Handler
    name: Handler
    max_batch_size: int
    records: dict[str, BackendRecord]  # the runtime chosen for each, by model name

    @property
    def runtimes(self) -> dict[str, str]:
        return {self.detector.name: self.find.backend, self.classifier.name: self.name.backend}


def load_models(checkpoint_dir: Path, classifier: str | None, backend: str, threads: int,
                records: dict[str, BackendRecord] | None = None) -> Models:
    """The first detector in `checkpoint_dir` and `classifier` (default: as /v1/detect, the one the
    detector's operating point was chosen with, else the most accurate), each on its chosen runtime
    (`records`: the runtimes another process chose, by model name)."""
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
    namer = namers[classifier or default_namer(detectors[0], {n: m.test_accuracy for n, m in namers.items()})]
    settings = Settings(checkpoint_dir=checkpoint_dir)
    handlers, chosen = [], {}
    for model in (detectors[0], namer):
        record = records[model.name] if records else \
            choose_backend(model, backend, cache_dir=settings.backend_cache_dir, batch_size=settings.max_batch_size,
                           parity_images=settings.backend_parity_images, threads=threads, half=settings.half)
        handlers.append(kind_of(model).handler(model, half=settings.half, backend=record, threads=threads))
        chosen[model.name] = record
    return Models(detectors[0], namer, *handlers, max_batch_size=settings.max_batch_size, records=chosen)


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
                                   rule=scene_rule(classifier.calibration.rule, detector),
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


def split_cores(total: int, workers: int | None) -> tuple[int, int]:
    """(worker processes, torch threads each) for `total` cores. By default one, this process, on
    every core's threads: on 2 cores it did 7.6 frames/s against 6.5 for two single-threaded workers
    over 120 frames, each worker paying ~5 s to start (docs/batch.md)."""
    workers = workers or 1
    return workers, max(1, total // workers)


_worker_models: Models | None = None


def _start_worker(checkpoint_dir: Path, classifier: str | None, records: dict[str, BackendRecord], threads: int) -> None:
    global _worker_models
    torch.set_num_threads(threads)
    _worker_models = load_models(checkpoint_dir, classifier, "torch", threads, records=records)


def _answer_in_worker(frames: list[Frame], min_score: float | None) -> list[list[dict]]:
    return answer(_worker_models, frames, min_score)


def by_frame(frames: list[Frame], answers: list[list[dict]]) -> dict[int, list[dict]]:
    return dict(zip((id(f) for f in frames), answers))


class Answerer:
    """Answers chunks of frames in order: here (one worker) or in worker processes, each holding
    the models, with a chunk per worker and one more in flight so no worker waits for the next."""

    def __init__(self, models: Models, workers: int, threads: int, checkpoint_dir: Path, min_score: float | None):
        self.models, self.min_score = models, min_score
        self.pool = None if workers == 1 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(checkpoint_dir, models.classifier.name, models.records, threads))
        self.in_flight = workers + 1

    def answered(self, chunks: Iterator[list[Frame]], fresh) -> Iterator[tuple[list[Frame], dict[int, list[dict]]]]:
        """(chunk, {id(frame): its signs} for the frames of fresh(chunk)) per chunk, in the order of `chunks`."""
        if self.pool is None:
            for chunk in chunks:
                todo = fresh(chunk)
                yield chunk, by_frame(todo, answer(self.models, todo, self.min_score) if todo else [])
            return
        pending: deque[tuple[list[Frame], list[Frame], Future | None]] = deque()
        for chunk in chunks:
            todo = fresh(chunk)
            pending.append((chunk, todo, self.pool.submit(_answer_in_worker, todo, self.min_score) if todo else None))
            if len(pending) >= self.in_flight:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    @staticmethod
    def _result(item: tuple[list[Frame], list[Frame], Future | None]) -> tuple[list[Frame], dict[int, list[dict]]]:
        chunk, todo, future = item
        return chunk, by_frame(todo, future.result() if future else [])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
