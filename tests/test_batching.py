"""The dynamic batcher: unit tests with a controllable forward function, and over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from app.batching import DynamicBatcher, QueueFull
from conftest import start_server
from helpers import files, samples, value


class GatedForward:
    """A real forward function (image i -> its pixel value) that records batch sizes and, while
    its gate is closed, blocks: so a test can hold the model busy and fill the queue at will."""

    def __init__(self, open_gate: bool = True) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.started = threading.Event()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(images))
        self.started.set()
        assert self.gate.wait(10), "gate never opened"
        return images.flatten(1)[:, :1].float()


def image(i: int) -> torch.Tensor:
    return torch.full((3, 4, 4), i, dtype=torch.uint8)


async def busy(batcher: DynamicBatcher, forward: GatedForward) -> asyncio.Future:
    """Submit one image and wait until the model is stuck on it (gate closed)."""
    [future] = batcher.submit([image(0)])
    await asyncio.to_thread(forward.started.wait, 5)
    return future


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def until(condition, seconds: float = 10) -> None:
    """Poll `condition` on the loop until it holds (fails after `seconds`): no sleep-and-hope."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def test_concurrent_submits_are_grouped_into_one_forward():
    async def main():
        forward = GatedForward()
        batcher = DynamicBatcher(forward, max_batch_size=32, max_wait_s=0.05, queue_size=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.predict([image(i)]) for i in range(10)))
        await batcher.stop()
        return forward.sizes, [r[0].item() for r in results]

    sizes, values = run(main())
    assert sizes == [10]
    assert values == list(range(10))


def test_images_queued_while_the_model_is_busy_form_the_next_batch():
    async def main():
        forward = GatedForward(open_gate=False)
        batcher = DynamicBatcher(forward, max_batch_size=16, max_wait_s=0, queue_size=200)
        batcher.start()
        first = await busy(batcher, forward)
        requests = [asyncio.ensure_future(batcher.predict([image(i), image(i + 1)])) for i in range(1, 100, 2)]
        await until(lambda: batcher.depth == 100)
        forward.gate.set()
        results = await asyncio.gather(first, *requests)
        await batcher.stop()
        return forward.sizes, results

    sizes, results = run(main())
    assert sizes[0] == 1 and sum(sizes) == 101
    assert all(s == 16 for s in sizes[1:-1]) and 1 <= sizes[-1] <= 16  # never above max_batch_size
    for i, pair in enumerate(results[1:]):
        assert [row.item() for row in pair] == [2 * i + 1, 2 * i + 2]  # each request gets its own rows


def test_max_wait_bounds_the_wait_for_company():
    async def main(max_wait_s: float, gap_s: float):
        forward = GatedForward()
        batcher = DynamicBatcher(forward, max_batch_size=64, max_wait_s=max_wait_s, queue_size=100)
        batcher.start()
        started = time.perf_counter()
        with batcher.expecting():  # a second request is being received
            first = asyncio.ensure_future(batcher.predict([image(1)]))
            done_at = []
            first.add_done_callback(lambda _: done_at.append(time.perf_counter()))
            await asyncio.sleep(gap_s)
            second_sent = time.perf_counter()
            second = asyncio.ensure_future(batcher.predict([image(2)]))
            await asyncio.sleep(0)  # let it submit
        await asyncio.gather(first, second)
        await batcher.stop()
        return forward.sizes, done_at[0] < second_sent

    sizes, _ = run(main(max_wait_s=0.3, gap_s=0.02))
    assert sizes == [2]  # the second image arrived within the wait and joined the first
    sizes, first_done_before_second = run(main(max_wait_s=0.02, gap_s=0.3))
    assert sizes == [1, 1] and first_done_before_second  # it went after ~max_wait, not after the gap


def test_a_lone_request_does_not_wait():
    MAX_WAIT_S = 30  # the run's own deadline: a batch that waited it out would fail the test

    async def main():
        forward = GatedForward()
        batcher = DynamicBatcher(forward, max_batch_size=64, max_wait_s=MAX_WAIT_S, queue_size=100)
        batcher.start()
        started = time.perf_counter()
        with batcher.expecting():  # the request itself, as the route announces it
            future = batcher.submit([image(1)])
        await asyncio.gather(*future)
        latency = time.perf_counter() - started
        await batcher.stop()
        return latency

    assert run(main()) < MAX_WAIT_S / 2  # nobody else announced: no reason to wait


class HeldForward:
    """An async forward (like the worker pool's) whose every batch waits until the test releases it."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gates: list[asyncio.Event] = []
        self.released = False

    async def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(images))
        if not self.released:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        return images.flatten(1)[:, :1].float()

    async def started(self, n: int) -> None:
        while len(self.sizes) < n:
            await asyncio.sleep(0.001)

    def release_all(self) -> None:
        self.released = True
        for gate in self.gates:
            gate.set()


def test_with_several_instances_a_batch_takes_its_fair_share():
    async def main():
        forward = HeldForward()
        batcher = DynamicBatcher(forward.forward, max_batch_size=64, max_wait_s=0, queue_size=100, instances=2)
        batcher.start()
        request = asyncio.ensure_future(batcher.predict([image(i) for i in range(12)]))
        await forward.started(2)
        forward.release_all()
        values = [r.item() for r in await request]
        await batcher.stop()
        return forward.sizes, values

    sizes, values = run(main())
    assert sizes == [6, 6]  # both instances at once, not one batch of 12 beside an idle instance
    assert values == list(range(12))


def test_while_another_forward_runs_a_free_instance_waits_for_arrivals():
    async def main(gap_s: float, arrivals: int):
        forward = HeldForward()
        batcher = DynamicBatcher(forward.forward, max_batch_size=64, max_wait_s=0.1, queue_size=100, instances=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.predict([image(i) for i in range(12)]))
        await forward.started(2)  # 6 + 6, both held
        forward.gates[1].set()  # one instance is free again, the other still runs its 6
        returning = []
        for i in range(arrivals):  # a burst of single-image requests, gap_s apart
            returning.append(asyncio.ensure_future(batcher.predict([image(20 + i)])))
            await asyncio.sleep(gap_s)
        await until(lambda: len(forward.sizes) == 3)  # the free instance's batch has gone
        sizes_while_held = list(forward.sizes)
        forward.release_all()
        await first
        values = [r[0].item() for r in await asyncio.gather(*returning)]
        await batcher.stop()
        return sizes_while_held, values

    sizes, values = run(main(gap_s=0.01, arrivals=6))
    assert sizes == [6, 6, 6]  # it waited for the whole burst instead of sending its first image alone
    assert values == list(range(20, 26))
    sizes, _ = run(main(gap_s=0.01, arrivals=2))
    assert sizes == [6, 6, 2]  # arrivals stopped: after max_wait without one it went with what it had


def test_full_queue_raises_queue_full_with_retry_after():
    async def main():
        forward = GatedForward(open_gate=False)
        batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0, queue_size=8, name="cnn")
        batcher.start()
        first = await busy(batcher, forward)
        queued = batcher.submit([image(i) for i in range(1, 8)])
        with pytest.raises(QueueFull) as refused:
            batcher.submit([image(8), image(9)])  # all or nothing: 7 + 2 > 8
        assert batcher.depth == 7
        last = batcher.submit([image(8)])  # one still fits
        with pytest.raises(QueueFull):
            batcher.submit([image(9)])
        forward.gate.set()
        values = [r.item() for r in await asyncio.gather(first, *queued, *last)]
        await batcher.stop()
        return refused.value, values

    refused, values = run(main())
    assert refused.retry_after >= 1 and "cnn" in str(refused)
    assert values == list(range(9))


def test_cancelled_requests_are_dropped_from_the_queue():
    async def main():
        forward = GatedForward(open_gate=False)
        batcher = DynamicBatcher(forward, max_batch_size=16, max_wait_s=0, queue_size=100)
        batcher.start()
        first = await busy(batcher, forward)
        gone = asyncio.ensure_future(batcher.predict([image(1), image(2), image(3)]))
        stays = asyncio.ensure_future(batcher.predict([image(4), image(5)]))
        await until(lambda: batcher.depth == 5)
        gone.cancel()  # its client disconnected
        forward.gate.set()
        await first
        result = await stays
        await batcher.stop()
        return forward.sizes, [r.item() for r in result]

    sizes, values = run(main())
    assert sizes == [1, 2] and values == [4, 5]


def test_an_async_forward_is_awaited_on_the_loop():
    """The worker-process forward is a coroutine function: the batcher awaits it without a thread."""
    sizes, threads = [], set()

    async def forward(images: torch.Tensor) -> torch.Tensor:
        sizes.append(len(images))
        threads.add(threading.get_ident())
        await asyncio.sleep(0.01)
        return images.flatten(1)[:, :1].float()

    async def main():
        batcher = DynamicBatcher(forward, max_batch_size=8, max_wait_s=0.05, queue_size=100, instances=2)
        batcher.start()
        results = await asyncio.gather(*(batcher.predict([image(i)]) for i in range(20)))
        await batcher.stop()
        return [r[0].item() for r in results], threading.get_ident()

    values, loop_thread = run(main())
    assert values == list(range(20))
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20
    assert threads == {loop_thread}


def test_a_failing_forward_fails_its_batch_only():
    calls = []

    def forward(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return images.flatten(1)[:, :1].float()

    async def main():
        batcher = DynamicBatcher(forward, max_batch_size=8, max_wait_s=0, queue_size=100)
        batcher.start()
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.predict([image(1)])
        result = await batcher.predict([image(2)])
        await batcher.stop()
        return result[0].item()

    assert run(main()) == 2


def test_batched_real_model_equals_one_image_at_a_time(checkpoint_snapshot, gtsrb_test_samples):
    from PIL import Image

    from app.kinds.classifier import Predictor
    from models.checkpoint import load_checkpoint
    from models.preprocessing import image_to_uint8

    predictor = Predictor(load_checkpoint(checkpoint_snapshot / "cnn.pt"))
    images = []
    for path, _ in gtsrb_test_samples[:24]:
        with Image.open(path) as im:
            images.append(image_to_uint8(im, predictor.loaded.preprocessing))

    async def main():
        batcher = DynamicBatcher(predictor.probabilities, max_batch_size=64, max_wait_s=0.05, queue_size=100)
        batcher.start()
        rows = await asyncio.gather(*(batcher.predict([im]) for im in images))
        await batcher.stop()
        return [r[0] for r in rows]

    batched = run(main())
    for im, row in zip(images, batched):
        torch.testing.assert_close(row, predictor.probabilities(im[None])[0], atol=1e-5, rtol=1e-4)


# --- over HTTP --------------------------------------------------------------------------------

def post_concurrently(url: str, n: int, body: list) -> list[httpx.Response]:
    barrier = threading.Barrier(n)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as client:
            barrier.wait()
            return client.post("/v1/predict", params={"model": "cnn"}, files=body)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_http_requests_share_forward_passes(server, client, sign_png):
    before = samples(client.get("/metrics").text)
    responses = post_concurrently(server.url, 32, files(("a.png", sign_png)))
    assert all(r.status_code == 200 for r in responses)
    after = samples(client.get("/metrics").text)
    images = value(after, "signserve_batch_size_sum", model="cnn") - value(before, "signserve_batch_size_sum", model="cnn")
    batches = value(after, "signserve_batch_size_count", model="cnn") - \
        value(before, "signserve_batch_size_count", model="cnn")
    assert images == 32 and batches < 32, f"{batches} forward passes for 32 concurrent requests"


@pytest.fixture(scope="module")
def small_queue_server(cnn_snapshot, tmp_path_factory):
    """A server whose queue holds exactly one request of 8 images, batching one image at a time;
    its forwards run in threads of the server process (the CUDA default), the other servers' in
    worker processes."""
    live = start_server(cnn_snapshot, tmp_path_factory.mktemp("small-queue") / "server.log",
                        queue_size=8, max_files_per_request=8, max_batch_size=1, max_wait_ms=0,
                        worker_processes="false")
    yield live
    live.stop()


def test_full_queue_answers_503_with_retry_after(small_queue_server, sign_png):
    body = files(*[(f"{i}.png", sign_png) for i in range(8)])
    responses = post_concurrently(small_queue_server.url, 16, body)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, [r.text for r in responses if r.status_code not in (200, 503)]
    assert 200 in statuses and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert "queued" in r.json()["detail"]
    with small_queue_server.client() as client:
        assert client.post("/v1/predict", files=body).status_code == 200  # recovered once the queue drained
        assert "in threads" in small_queue_server.log()
        rejected = value(samples(client.get("/metrics").text), "signserve_queue_rejections_total", model="cnn")
        assert rejected == statuses.count(503)
