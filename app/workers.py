"""Forward passes in worker processes, so they never wait for the event loop's GIL.

In one process, a forward thread must re-take the GIL after every tensor op; while the event loop
is busy parsing HTTP and decoding images it holds the GIL for up to the switch interval (5 ms),
and the forward thread sits idle. Measured on the 2-core dev machine: a single-threaded cnn
forward ran at 205 images/s beside a busy Python thread, against 311 beside an equally busy
thread that does not hold the GIL. Worker processes each own a GIL, the OS schedules them
against the event loop fairly, and the cost is one pipe round trip per batch (~0.1 ms against
tens of milliseconds of forward).

Each worker loads every served checkpoint (the same files and the same `Predictor` as the
in-process path), warms up, and then answers `(model, shape, pixels)` with `Predictor.ranked`.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

log = logging.getLogger("signserve")

Ranked = list[tuple[list[int], list[float]]]


@dataclass(frozen=True)
class WorkerConfig:
    checkpoints: dict[str, str]  # model name -> checkpoint path
    device: str
    half: bool
    channels_last: bool
    torch_threads: int
    warmup_batch_size: int | None  # None: no warm-up


def _serve(conn: Connection, config: WorkerConfig) -> None:
    """The worker process: load, warm up, report, then answer batches until told to stop."""
    from app.engine import Predictor
    from models.checkpoint import load_checkpoint

    torch.set_num_threads(config.torch_threads)
    try:
        predictors = {}
        for name, path in config.checkpoints.items():
            loaded = load_checkpoint(path, device=config.device, name=name)
            predictors[name] = Predictor(loaded, half=config.half, channels_last=config.channels_last)
            if config.warmup_batch_size:
                predictors[name].warmup(config.warmup_batch_size)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    with torch.inference_mode():
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the server went away
                return
            if message is None:
                return
            name, shape, pixels = message
            try:
                images = torch.frombuffer(pixels, dtype=torch.uint8).view(shape)
                conn.send(("ok", predictors[name].ranked(images)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerDied(RuntimeError):
    pass


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class WorkerPool:
    """`processes` worker processes; `forward(name)` is a blocking callable that runs one batch on
    whichever worker is idle (call it from threads, e.g. the batcher's executor)."""

    def __init__(self, config: WorkerConfig, processes: int) -> None:
        self.config = config
        self.processes = processes
        self._context = multiprocessing.get_context("spawn")  # no fork: torch and threads do not mix with it
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.config), name="signserve-forward",
                                        daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    @staticmethod
    def _await_ready(worker: _Worker) -> None:
        try:
            status, detail = worker.conn.recv()
        except EOFError:
            raise WorkerDied(f"forward worker exited with {worker.process.exitcode} while loading") from None
        if status != "ready":
            raise WorkerDied(f"forward worker could not load the models: {detail}")

    def start(self) -> None:
        """Start every worker and wait until each has loaded and warmed up (blocking)."""
        workers = [self._spawn() for _ in range(self.processes)]  # they load in parallel
        try:
            for worker in workers:
                self._await_ready(worker)
        except BaseException:
            for worker in workers:
                worker.process.kill()
            raise
        for worker in workers:
            self._all.append(worker)
            self._idle.put(worker)

    def forward(self, name: str) -> Callable[[torch.Tensor], Ranked]:
        def run(images: torch.Tensor) -> Ranked:
            return self._run(name, images)

        return run

    def _run(self, name: str, images: torch.Tensor) -> Ranked:
        worker = self._take()
        try:
            worker.conn.send((name, tuple(images.shape), images.contiguous().numpy().tobytes()))
            status, result = worker.conn.recv()
        except (EOFError, OSError):
            self._give_back(self._replace(worker))
            raise WorkerDied("a forward worker died during this batch; it has been restarted") from None
        self._give_back(worker)
        if status != "ok":
            raise RuntimeError(f"forward failed in the worker: {result}")
        return result

    def _take(self) -> _Worker:
        while True:
            if not self._all or self._closed:
                raise WorkerDied("no forward worker is running")
            try:
                return self._idle.get(timeout=1)
            except queue.Empty:
                continue  # all busy: wait on, unless they have all gone meanwhile

    def _give_back(self, worker: _Worker) -> None:
        if not self._closed:
            self._idle.put(worker)

    def _replace(self, dead: _Worker) -> _Worker:
        log.error("forward worker %s died (exit code %s); starting another", dead.process.pid, dead.process.exitcode)
        dead.conn.close()
        with self._lock:
            self._all = [w for w in self._all if w is not dead]
        worker = self._spawn()
        self._await_ready(worker)  # if this raises, the pool is one worker short (and says so when empty)
        with self._lock:
            self._all.append(worker)
        return worker

    def close(self, timeout_s: float = 5) -> None:
        self._closed = True
        for worker in self._all:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._all:
            worker.process.join(timeout_s)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
        self._all.clear()

    @staticmethod
    def config_for(paths: dict[str, Path], device: torch.device, *, half: bool, channels_last: bool, threads: int,
                   warmup_batch_size: int | None) -> WorkerConfig:
        return WorkerConfig({name: str(path) for name, path in paths.items()}, str(device), half, channels_last,
                            threads, warmup_batch_size)
