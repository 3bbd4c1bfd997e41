"""Forward passes in worker processes, so they never wait for the event loop's GIL.

In one process, a forward thread must re-take the GIL after every tensor op; while the event loop
is busy parsing HTTP and decoding images it holds the GIL for up to the switch interval (5 ms),
and the forward thread sits idle. Measured on the 2-core dev machine: a single-threaded cnn
forward ran at 205 images/s beside a busy Python thread, against 311 beside an equally busy
thread that does not hold the GIL. Worker processes each own a GIL, the OS schedules them
against the event loop, and the cost is one socket round trip per batch (~0.1 ms against
tens of milliseconds of forward).

Each worker loads every served checkpoint (the same files and the same `Predictor` as the
in-process path), warms up, and then answers `(model, shape, pixels)` with `Predictor.ranked`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from models.backends import BackendRecord

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
    nice: int = 0  # added to the workers' CPU scheduling niceness
    backends: dict[str, dict] = field(default_factory=dict)  # model name -> BackendRecord.to_dict(); absent: torch


def _serve(conn: Connection, config: WorkerConfig) -> None:
    """The worker process: load, warm up, report, then answer batches until told to stop."""
    from app.engine import Predictor
    from models.backends import BackendRecord
    from models.checkpoint import load_checkpoint

    torch.set_num_threads(config.torch_threads)
    if config.nice:
        os.nice(config.nice)
    try:
        predictors = {}
        for name, path in config.checkpoints.items():
            loaded = load_checkpoint(path, device=config.device, name=name)
            backend = config.backends.get(name)
            predictors[name] = Predictor(loaded, half=config.half, channels_last=config.channels_last,
                                         backend=BackendRecord.from_dict(backend) if backend else None,
                                         threads=config.torch_threads)
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
                images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(shape)
                conn.send(("ok", predictors[name].ranked(images)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerDied(RuntimeError):
    pass


# multiprocessing.Connection's framing, which the worker reads and writes: a signed 32-bit length,
# then the pickled message. The server side speaks it over asyncio streams.
_FRAME = struct.Struct("!i")


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection  # blocking: the start-up handshake and the stop message
    reader: asyncio.StreamReader | None = None  # the same socket on the event loop, opened at first use
    writer: asyncio.StreamWriter | None = None

    async def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.writer is None:
            sock = socket.socket(fileno=os.dup(self.conn.fileno()))
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        return self.reader, self.writer

    def close_streams(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WorkerPool:
    """`processes` worker processes; `forward(name)` is an async callable that runs one batch on
    whichever worker is idle. The event loop talks to each worker's socket itself (asyncio streams,
    no thread per forward), so a batch costs the server one write and one read, never a GIL hand-off.

    `nice` lowers the workers' CPU priority: when the cores are oversubscribed the event loop, which
    parses requests and feeds the batcher, runs first, so images reach the queue sooner and the
    forwards run on fuller batches (ResNet18 reads its 45 MB of weights once per forward, so on a
    CPU its cost per image falls steeply with the batch)."""

    def __init__(self, config: WorkerConfig, processes: int) -> None:
        self.config = config
        self.processes = processes
        self._context = multiprocessing.get_context("spawn")  # no fork: torch and threads do not mix with it
        self._idle: deque[_Worker] = deque()
        self._slots: asyncio.Semaphore | None = None  # one per idle worker
        self._all: list[_Worker] = []
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
        """Start every worker and wait until each has loaded and warmed up (blocking; run it in a
        thread from async code)."""
        workers = [self._spawn() for _ in range(self.processes)]  # they load in parallel
        try:
            for worker in workers:
                self._await_ready(worker)
        except BaseException:
            for worker in workers:
                worker.process.kill()
            raise
        self._all.extend(workers)
        self._idle.extend(workers)
        self._slots = asyncio.Semaphore(len(workers))

    def forward(self, name: str) -> Callable[[torch.Tensor], Awaitable[Ranked]]:
        async def run(images: torch.Tensor) -> Ranked:
            return await self.run(name, images)

        return run

    async def run(self, name: str, images: torch.Tensor) -> Ranked:
        """One batch on an idle worker. Cancelling the caller does not cancel the exchange: the
        worker's answer is still read, so it can never be taken for the next batch's."""
        if self._slots is None or self._closed:
            raise WorkerDied("no forward worker is running")
        await self._slots.acquire()
        message = (name, tuple(images.shape), images.contiguous().numpy().tobytes())
        exchange = asyncio.get_running_loop().create_task(self._exchange(self._idle.popleft(), message))
        status, result = await asyncio.shield(exchange)
        if status != "ok":
            raise RuntimeError(f"forward failed in the worker: {result}")
        return result

    async def _exchange(self, worker: _Worker, message: tuple) -> tuple[str, object]:
        try:
            try:
                reader, writer = await worker.streams()
                payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
                writer.writelines([_FRAME.pack(len(payload)), payload])
                await writer.drain()
                [size] = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                return pickle.loads(await reader.readexactly(size))
            except (EOFError, OSError):  # IncompleteReadError is an EOFError
                worker = await asyncio.to_thread(self._replace, worker)
                raise WorkerDied("a forward worker died during this batch; it has been restarted") from None
        finally:
            if not self._closed:
                self._idle.append(worker)
                self._slots.release()

    def _replace(self, dead: _Worker) -> _Worker:
        log.error("forward worker %s died (exit code %s); starting another", dead.process.pid, dead.process.exitcode)
        dead.close_streams()
        dead.conn.close()
        self._all = [w for w in self._all if w is not dead]
        worker = self._spawn()
        self._await_ready(worker)
        self._all.append(worker)
        return worker

    async def close(self, timeout_s: float = 5) -> None:
        """Stop every worker (call it on the loop that ran the forwards)."""
        self._closed = True
        for worker in self._all:
            worker.close_streams()
        await asyncio.to_thread(self._stop_processes, timeout_s)

    def _stop_processes(self, timeout_s: float) -> None:
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
                   warmup_batch_size: int | None, nice: int = 0,
                   backends: dict[str, BackendRecord] | None = None) -> WorkerConfig:
        return WorkerConfig({name: str(path) for name, path in paths.items()}, str(device), half, channels_last,
                            threads, warmup_batch_size, nice,
                            {name: record.to_dict() for name, record in (backends or {}).items()})
