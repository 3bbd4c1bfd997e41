"""Dynamic batching: images from concurrent requests share one forward pass.

Like Triton's dynamic batcher, a batch is dispatched as soon as it holds `max_batch_size` images,
or when its oldest image has waited `max_wait_s`, whichever comes first. Under load the model is
busy when images arrive, so they have already waited by the time it is free and go straight into
the next (large) batch; at low load an image waits at most `max_wait_s` for company.

Unlike Triton, it only waits for company that exists: routes announce a request as soon as they
start receiving it (`expecting()`), and when no announced request is still on its way the batch
goes at once. A lone client therefore never pays `max_wait_s`.

Up to `instances` forwards run at once (Triton's instance count), off the event loop, so HTTP
parsing, decoding and the next batch's collection overlap with them: a plain forward function runs
in dedicated threads; an async one (app.workers: forward worker processes) is awaited on the loop.
On a CPU, several single-threaded instances use the cores better than one multi-threaded forward:
no OpenMP barrier stalls when the event loop takes a core for a moment. With several instances a
batch takes at most its fair share, the images queued, running and announced (or their recent
peak) split evenly over the instances, and while other forwards run it waits for that share as
long as images keep arriving (gaps under `max_wait_s`): waiting costs nothing while the other
instances are busy, and it keeps a free instance from grabbing the first image of a returning
burst as a batch of one, the rest then piling up behind it (docs/serving.md has the measurements).
The queue is bounded: when it is full `submit` raises `QueueFull` at once (the route answers
503 + Retry-After) instead of letting latency grow without end.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# uint8 images [N, 3, S, S] -> N results, one per image (a tensor's rows, or a list); plain or async
ForwardFn = Callable[[torch.Tensor], Sequence] | Callable[[torch.Tensor], Awaitable[Sequence]]
BatchObserver = Callable[[int, float], None]


class QueueFull(Exception):
    def __init__(self, name: str, retry_after: int) -> None:
        super().__init__(f"model {name!r} has too many images queued; retry in {retry_after} s")
        self.retry_after = retry_after


class TooManyImages(Exception):
    """More images in one request than the queue can ever hold: retrying cannot help (413)."""

    def __init__(self, name: str, count: int, queue_size: int) -> None:
        super().__init__(f"{count} images in one request, more than the {queue_size} that model {name!r} can "
                         f"ever queue (SIGNSERVE_QUEUE_SIZE); send at most {queue_size} per request")


@dataclass(slots=True)
class _Item:
    image: torch.Tensor
    future: asyncio.Future
    enqueued: float


class DynamicBatcher:
    def __init__(self, forward: ForwardFn, *, max_batch_size: int = 64, max_wait_s: float = 0.002,
                 queue_size: int = 1024, instances: int = 1, name: str = "model",
                 on_batch: BatchObserver | None = None,
                 collate: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack) -> None:
        if max_batch_size < 1 or queue_size < 1 or instances < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size, queue_size and instances must be >= 1, max_wait_s >= 0")
        self.forward = forward  # the model's forward path; app.service.Service.forward_path says which
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.instances = instances
        self.name = name
        self.on_batch = on_batch
        self.collate = collate  # images -> one batch tensor (the detector pads frames of unequal sizes)
        self._items: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = None if inspect.iscoroutinefunction(forward) else \
            ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"forward-{name}")
        self._free = asyncio.Semaphore(instances)
        self._tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self._expected = 0  # requests announced by `expecting()` that have not submitted yet
        self._running = 0  # images in forwards now running
        self._recent_peak = 0.0  # most images queued and running at once lately (decays per batch)
        self._last_arrival = 0.0  # loop time of the latest submit

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
        await asyncio.gather(*self._tasks, return_exceptions=True)  # let running forwards finish
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until the queue, plus `extra` images, has likely drained (at least 1)."""
        return max(1, min(60, math.ceil((self.depth + extra) * self._seconds_per_image)))

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce a request that is being received and will `submit` (or fail) within the block;
        while any is announced, a partial batch may wait up to max_wait_s for it."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1
            if self._expected == 0 and self._items:
                self._wakeup.set()

    def check_admissible(self, count: int) -> None:
        """TooManyImages when `count` images could never be queued at once, however idle the model."""
        if count > self.queue_size:
            raise TooManyImages(self.name, count, self.queue_size)

    def submit(self, images: Sequence[torch.Tensor]) -> list[asyncio.Future]:
        """Queue uint8 images [3, S, S]; each future resolves to that image's result from `forward`.
        All or none are queued: QueueFull when they do not fit now, TooManyImages when they never can."""
        if self._task is None:
            raise RuntimeError(f"batcher {self.name!r} is not running")
        self.check_admissible(len(images))
        if self.depth + len(images) > self.queue_size:
            raise QueueFull(self.name, self.retry_after(len(images)))
        loop = asyncio.get_running_loop()
        self._last_arrival = now = loop.time()
        futures = []
        for image in images:
            future = loop.create_future()
            self._items.append(_Item(image, future, now))
            futures.append(future)
        self._recent_peak = max(self._recent_peak, self.depth + self._running)
        self._wakeup.set()  # a collecting batch re-checks its size and restarts its wait
        return futures

    async def predict(self, images: Sequence[torch.Tensor]) -> list:
        """The result for each image, in order (cancelling this cancels its queued images)."""
        return list(await asyncio.gather(*self.submit(images)))

    def _fair_share(self) -> int:
        """The most this batch may take: images queued, running and announced, split over the instances.
        The recent peak stands in for requests that are on their way back (answered, their clients
        about to send the next): without it a closed loop of clients can settle into more groups
        than instances, a whole group always queued, and every batch smaller than it need be."""
        images = max(self.depth + self._running + self._expected, math.floor(self._recent_peak))
        return min(self.max_batch_size, max(1, math.ceil(images / self.instances)))

    def _wait_deadline(self) -> float:
        """While other forwards run, wait as long as images keep arriving; else for the oldest's max_wait."""
        if self._running:
            return self._last_arrival + self.max_wait_s
        return self._items[0].enqueued + self.max_wait_s

    async def _collect(self) -> list[_Item]:
        """The next batch, once an instance is free (the caller holds `_free`)."""
        loop = asyncio.get_running_loop()
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        while self.depth < self._fair_share() and (self._expected > 0 or self._running > 0):
            remaining = self._wait_deadline() - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                pass  # the deadline may have moved on meanwhile: the loop condition decides
        share = self._fair_share()
        batch: list[_Item] = []
        while self._items and len(batch) < share:
            item = self._items.popleft()
            if not item.future.done():  # done here means cancelled: its client went away
                batch.append(item)
        return batch

    def _forward_batch(self, images: list[torch.Tensor]) -> Sequence:
        return self.forward(self.collate(images))

    async def _run(self) -> None:
        while True:
            await self._free.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._free.release()
                raise
            if not batch:
                self._free.release()
                continue
            self._running += len(batch)
            self._recent_peak *= 0.9  # forget a load that has gone within a few dozen batches
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            images = [item.image for item in batch]
            # The forward itself: a worker process's handler (awaited) or this process's (in a thread); app.kinds says which.
            if self._executor is None:
                results = await self.forward(self.collate(images))
            else:
                results = await loop.run_in_executor(self._executor, self._forward_batch, images)
        except Exception as exc:  # a failing forward fails its batch, not the batcher
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._running -= len(batch)
            self._free.release()
            self._wakeup.set()  # a batch waiting because this forward ran may have to wait no longer
        seconds = time.perf_counter() - started
        per_image = seconds / len(batch) / self.instances
        self._seconds_per_image = per_image if not self._seconds_per_image else \
            0.9 * self._seconds_per_image + 0.1 * per_image
        for item, row in zip(batch, results):
            if not item.future.done():
                item.future.set_result(row)
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
