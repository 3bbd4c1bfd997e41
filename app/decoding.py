"""Decoding a request's uploads within the decoded-pixel budgets.

A small compressed file can declare a huge image (a 1.5 kB lossless WebP decodes to 38 Mpx), so
what an upload costs is counted in decoded pixels, read from its header before any pixel is
decoded: at most `per_request` for the images of one request (413 beyond, naming the figures), and
at most `in_flight` being decoded at once in the whole process (a request waits for its turn, 503
+ Retry-After if that takes longer than `max_wait_s`). A format that can decode at a reduced scale
(JPEG) is counted at that scale, so a 48 Mpx phone photo costs what its reduced decode does.
After a large decode the freed memory is handed back to the OS (app.memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from app.imaging import Decoder, ImageRejected, decoded_pixels, decodes_inline, open_image
from app.memory import release_free_memory
from app.uploads import Upload

T = TypeVar("T")

# After a decode of at least this many pixels the allocator's free memory is returned to the OS.
RELEASE_AFTER_PIXELS = 4_000_000


class DecodeBudget:
    """Decoded pixels: `per_request` per request, `in_flight` being decoded at once in the process."""

    def __init__(self, per_request: int, in_flight: int, max_wait_s: float = 30.0) -> None:
        if per_request < 1 or in_flight < per_request:
            raise ValueError("need 1 <= per_request <= in_flight")
        self.per_request = per_request
        self.in_flight = in_flight
        self.max_wait_s = max_wait_s
        self.used = 0  # pixels being decoded now
        self.peak = 0  # the most ever decoded at once (for tests and the metrics)
        self._changed: asyncio.Condition | None = None

    def reset_peak(self) -> None:
        """Count the peak from now on (what is being decoded now is its floor)."""
        self.peak = self.used

    def check_request(self, costs: Sequence[int]) -> None:
        total = sum(costs)
        if total > self.per_request:
            raise ImageRejected(413, f"the images of this request decode to {total:,} pixels, above the "
                                     f"limit of {self.per_request:,} per request (send fewer or smaller images; "
                                     "a progressive JPEG counts its full size, however far it is reduced)")

    @asynccontextmanager
    async def reserve(self, pixels: int):
        """Hold `pixels` of the process budget while the block runs (waiting for them if need be)."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            try:
                async with asyncio.timeout(self.max_wait_s):
                    await changed.wait_for(lambda: self.used + pixels <= self.in_flight)
            except TimeoutError:
                raise HTTPException(503, f"the server is busy decoding other large images (more than "
                                         f"{self.in_flight:,} pixels at once); retry shortly",
                                    headers={"Retry-After": "2"}) from None
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with changed:
                self.used -= pixels
                changed.notify_all()


def display_name(upload: Upload, index: int) -> str:
    return upload.filename or f"#{index + 1}"


def _load_and_release(decoder: Decoder[T], image, name: str, declared: tuple[int, int], pixels: int) -> T:
    try:
        return decoder.load(image, name, declared)
    finally:
        if pixels >= RELEASE_AFTER_PIXELS:
            release_free_memory()


async def decode_uploads(uploads: Sequence[Upload], decoder: Decoder[T], budget: DecodeBudget,
                         max_pixels: int) -> list[T]:
    """Every upload decoded by `decoder`, in order. All headers are read and the request's budget is
    checked before any pixel is decoded, so a bad or over-budget file fails the request at once;
    small images decode inline, large ones in the thread pool, each holding its pixels of the
    process budget while it decodes."""
    names = [display_name(u, i) for i, u in enumerate(uploads)]
    images = [open_image(u.data, name, max_pixels) for u, name in zip(uploads, names)]
    declared = [image.size for image in images]
    for image in images:
        decoder.reduce(image)
    costs = [decoded_pixels(image, size) for image, size in zip(images, declared)]
    budget.check_request(costs)
    results: list[T | None] = [None] * len(images)
    slow = []
    for i, image in enumerate(images):
        if decodes_inline(costs[i]):
            results[i] = decoder.load(image, names[i], declared[i])
        else:
            slow.append(i)

    async def decode(i: int) -> None:
        async with budget.reserve(costs[i]):
            results[i] = await run_in_threadpool(_load_and_release, decoder, images[i], names[i], declared[i],
                                                 costs[i])

    # Shielded: a decode in a thread cannot be stopped, so if the client goes away its pixels stay
    # reserved until the thread is done with them.
    outcomes = await asyncio.shield(asyncio.gather(*(decode(i) for i in slow), return_exceptions=True))
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return results  # type: ignore[return-value]
