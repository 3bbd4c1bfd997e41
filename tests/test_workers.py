"""Forward worker processes: they answer exactly what the in-process predictor answers, batches
larger than a socket buffer included; a worker that dies is replaced and the service keeps answering."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import start_server
from helpers import files, forward_workers
from models.checkpoint import load_checkpoint


def test_worker_pool_answers_like_the_in_process_predictor(checkpoint_snapshot):
    """Two workers, concurrent batches of 64 ResNet18 inputs (786 kB each, more than a Unix socket
    buffer holds) and one of the cnn, all over the event loop's streams."""
    from app.kinds.classifier import Predictor
    from app.workers import WorkerPool
    from models.checkpoint import load_checkpoint

    paths = {name: checkpoint_snapshot / f"{name}.pt" for name in ("cnn", "resnet18")}
    side = {name: load_checkpoint(path).preprocessing.input_size for name, path in paths.items()}
    pool = WorkerPool(WorkerPool.config_for(paths, torch.device("cpu"), half=False, channels_last=True, threads=1,
                                            warmup_batch_size=None, nice=5), processes=2)
    pool.start()
    processes = [worker.process for worker in pool._all]
    generator = torch.Generator().manual_seed(0)
    batches = {"resnet18": [torch.randint(0, 256, (64, 3, side["resnet18"], side["resnet18"]), dtype=torch.uint8,
                                          generator=generator) for _ in range(3)],
               "cnn": [torch.randint(0, 256, (5, 3, side["cnn"], side["cnn"]), dtype=torch.uint8, generator=generator)]}

    async def run() -> dict[str, list]:
        try:
            jobs = {name: [pool.forward(name)(batch) for batch in items] for name, items in batches.items()}
            return {name: await asyncio.gather(*coroutines) for name, coroutines in jobs.items()}
        finally:
            await pool.close()

    answers = asyncio.run(asyncio.wait_for(run(), 120))
    for name, items in batches.items():
        predictor = Predictor(load_checkpoint(paths[name], name=name))
        for batch, answer in zip(items, answers[name]):
            expected = predictor.run(batch)
            assert len(answer) == len(batch)
            for (ids, probabilities, *_), (want_ids, want_probabilities, *_) in zip(answer, expected):
                assert ids[0] == want_ids[0]
                torch.testing.assert_close(torch.tensor(probabilities), torch.tensor(want_probabilities),
                                           atol=1e-5, rtol=1e-4)
    assert len(processes) == 2 and not any(process.is_alive() for process in processes)  # closed


@pytest.fixture(scope="module")
def process_server(cnn_snapshot, tmp_path_factory):
    live = start_server(cnn_snapshot, tmp_path_factory.mktemp("workers") / "server.log",
                        device="cpu", worker_processes="true", instances=2)
    yield live
    live.stop()


def test_a_killed_worker_is_replaced(process_server, sign_png):
    with process_server.client() as client:
        assert client.post("/v1/predict", files=files(("a.png", sign_png))).status_code == 200
        forward = forward_workers(process_server)
        assert len(forward) == 2, forward
        os.kill(forward[0], signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = client.post("/v1/predict", files=files(("a.png", sign_png)))
            statuses.append(response.status_code)
            if statuses[-3:] == [200, 200, 200] and len(statuses) >= 4:
                break
            if response.status_code != 200:
                assert response.status_code == 503 and "worker died" in response.json()["detail"], response.text
                assert response.headers["Retry-After"] == "1"
        assert statuses[-3:] == [200, 200, 200], statuses
        assert statuses.count(503) <= 1  # only the batch that was on the dead worker
        assert client.get("/readyz").status_code == 200
    assert process_server.process.poll() is None
    assert "died" in process_server.log()


def test_closing_while_a_replacement_loads_does_not_wait_for_it(checkpoint_snapshot):
    """A worker dies and its replacement starts loading (seconds: a new interpreter, torch, the
    models); closing the pool then must not wait for that load, and kills the replacement."""
    import multiprocessing

    from app.workers import WorkerDied, WorkerPool

    config = WorkerPool.config_for({"cnn": checkpoint_snapshot / "cnn.pt"}, torch.device("cpu"), half=False,
                                   channels_last=True, threads=1, warmup_batch_size=None)
    pool = WorkerPool(config, processes=1)
    started = time.monotonic()
    pool.start()
    load_s = time.monotonic() - started  # what a replacement's start takes too
    side = load_checkpoint(checkpoint_snapshot / "cnn.pt").preprocessing.input_size
    batch = torch.zeros(1, 3, side, side, dtype=torch.uint8)

    async def kill_then_close() -> float:
        await pool.forward("cnn")(batch)
        os.kill(pool._all[0].process.pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            await pool.forward("cnn")(batch)  # the death is noticed, the replacement is started
        deadline = time.monotonic() + 30
        while not any(p.name == "signserve-forward" and p.is_alive() for p in multiprocessing.active_children()):
            assert time.monotonic() < deadline, "no replacement worker started"
            await asyncio.sleep(0.01)  # until the replacement is loading
        closing = time.monotonic()
        await pool.close()
        return closing

    closing = asyncio.run(kill_then_close())  # asyncio.run also waits for the loading thread
    closed_in = time.monotonic() - closing
    assert closed_in < load_s / 2, (closed_in, load_s)
    deadline = time.monotonic() + 5
    while any(p.name == "signserve-forward" for p in multiprocessing.active_children()):
        assert time.monotonic() < deadline, "the replacement outlived the pool"
        time.sleep(0.1)
