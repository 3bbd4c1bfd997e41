"""Dynamic batching: images from concurrent requests share one forward pass.

Like Triton's dynamic batcher, a batch is dispatched as soon as it holds `max_batch_size` images,
or when its oldest image has waited `max_wait_s`, whichever comes first. Under load the model is
busy when images arrive, so they have already waited by the time it is free and go straight into
the next (large) batch; at low load an image waits at most `max_wait_s` for company.

The forward runs in a single dedicated thread, off the event loop, so HTTP parsing, decoding and
the next batch's collection overlap with it. The queue is bounded: when it is full `submit` raises
`QueueFull` at once (the route answers 503 + Retry-After) instead of letting latency grow without end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
BatchObserver = Callable[[int, float], None]


class QueueFull(Exception):
    def __init__(self, name: str, retry_after: int) -> None:
        super().__init__(f"model {name!r} has too many images queued; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(slots=True)
class _Item:
    image: torch.Tensor
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    def __init__(self, forward: ForwardFn, *, max_batch_size: int = 64, max_wait_s: float = 0.002,
                 queue_size: int = 1024, name: str = "model", on_batch: BatchObserver | None = None) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_wait_s >= 0")
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.name = name
        self.on_batch = on_batch
        self._items: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self._task: asyncio.Task | None = None
        self._seconds_per_image = 0.0  # moving average, for Retry-After

    @property
    def depth(self) -> int:
        """Images waiting for a forward pass (not counting the one running)."""
        return len(self._items)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until the queue, plus `extra` images, has likely drained (at least 1)."""
        return max(1, min(60, math.ceil((self.depth + extra) * self._seconds_per_image)))

    def submit(self, images: Sequence[torch.Tensor]) -> list[asyncio.Future]:
        """Queue uint8 images [3, S, S]; each future resolves to that image's probabilities [C].
        All or none are queued: QueueFull when they do not fit."""
        if self._task is None:
            raise RuntimeError(f"batcher {self.name!r} is not running")
        if self.depth + len(images) > self.queue_size:
            raise QueueFull(self.name, self.retry_after(len(images)))
        loop = asyncio.get_running_loop()
        now = loop.time()
        was_empty = not self._items
        futures = []
        for image in images:
            future = loop.create_future()
            self._items.append(_Item(image, future, now))
            futures.append(future)
        # Wake the worker only when it can act: first image in (idle), or a full batch (collecting).
        if was_empty or self.depth >= self.max_batch_size:
            self._wakeup.set()
        return futures

    async def predict(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities for each image, in order (cancelling this cancels its queued images)."""
        return list(await asyncio.gather(*self.submit(images)))

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        while self.depth < self.max_batch_size:
            remaining = self._items[0].enqueued + self.max_wait_s - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        batch: list[_Item] = []
        while self._items and len(batch) < self.max_batch_size:
            item = self._items.popleft()
            if not item.future.done():  # done here means cancelled: its client went away
                batch.append(item)
        return batch

    def _forward_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.forward(torch.stack(images))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                probabilities = await loop.run_in_executor(self._executor, self._forward_batch,
                                                           [item.image for item in batch])
            except Exception as exc:  # a failing forward fails its batch, not the batcher
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - started
            per_image = seconds / len(batch)
            self._seconds_per_image = per_image if not self._seconds_per_image else \
                0.9 * self._seconds_per_image + 0.1 * per_image
            for item, row in zip(batch, probabilities):
                if not item.future.done():
                    item.future.set_result(row)
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
