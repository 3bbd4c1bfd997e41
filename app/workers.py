"""Forward passes in worker processes, so they never wait for the event loop's GIL.

In one process, a forward thread must re-take the GIL after every tensor op; while the event loop
is busy parsing HTTP and decoding images it holds the GIL for up to the switch interval (5 ms),
and the forward thread sits idle. Measured on the 2-core dev machine: a single-threaded cnn
forward ran at 205 images/s beside a busy Python thread, against 311 beside an equally busy
thread that does not hold the GIL. Worker processes each own a GIL, the OS schedules them
against the event loop, and the cost is one socket round trip per batch (~0.1 ms against
tens of milliseconds of forward).

Each worker loads every served checkpoint (the same files and the same handler as the in-process
path: its kind's, app.kinds), warms up, and then answers `(model, shape, pixels)` with the handler's
`run`. A `swap` message replaces one model's handler between two batches (a newly chosen runtime).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from models.backends import BackendRecord

log = logging.getLogger("signserve")

Answers = list  # per image, the handler's answer (app.kinds: a Ranked, or a detector's boxes)
PING = "ping"  # the watchdog's liveness check; a worker answers ("ok", None)
SWAP = "swap"  # ("swap", model, BackendRecord.to_dict()): load and warm that runtime; answers ("ok", its label)


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
    from app.kinds import kind_of
    from models.checkpoint import load_checkpoint

    torch.set_num_threads(config.torch_threads)
    if config.nice:
        os.nice(config.nice)
    loaded = {}

    def handler(name: str, backend: dict | None):
        made = kind_of(loaded[name]).handler(loaded[name], half=config.half, channels_last=config.channels_last,
                                             backend=BackendRecord.from_dict(backend) if backend else None,
                                             threads=config.torch_threads)
        if config.warmup_batch_size:
            made.warmup(config.warmup_batch_size)
        return made

    try:
        handlers = {}
        for name, path in config.checkpoints.items():
            loaded[name] = load_checkpoint(path, device=config.device, name=name)
            handlers[name] = handler(name, config.backends.get(name))
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    # what each model really runs here: the chosen runtime, or torch fp32 where its file could not be used
    conn.send(("ready", {name: h.backend for name, h in handlers.items()}))
    with torch.inference_mode():
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the server went away
                return
            if message is None:
                return
            if message == PING:
                conn.send(("ok", None))
                continue
            try:
                if message[0] == SWAP:  # serve a model on another runtime from the next batch on
                    _, name, backend = message
                    handlers[name] = handler(name, backend)
                    conn.send(("ok", handlers[name].backend))
                    continue
                name, shape, pixels = message
                images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(shape)
                conn.send(("ok", handlers[name].run(images)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerDied(RuntimeError):
    """The batch's worker died and the batch could not be retried: the client may retry (503)."""


class PoolClosed(RuntimeError):
    """The pool was closed while a worker was starting; the worker has been killed."""


class WorkerHung(RuntimeError):
    """The batch's worker did not answer in time; it has been killed and is being replaced (504)."""


# multiprocessing.Connection's framing, which the worker reads and writes: a signed 32-bit length,
# then the pickled message. The server side speaks it over asyncio streams.
_FRAME = struct.Struct("!i")


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection  # blocking: the start-up handshake and the stop message
    runs: dict[str, str] = field(default_factory=dict)  # model name -> the backend label it runs
    busy_since: float | None = None  # monotonic time its current exchange began; None when idle
    swapping: bool = False  # loading another runtime for a model: busy, but not stalled
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

    A watchdog keeps the pool whole. A worker that does not answer a batch, or an idle worker that
    does not answer a ping, within `timeout_s` is killed (SIGKILL stops even a stopped process) and
    a replacement starts in the background; its batch fails with WorkerHung. A worker found dead
    (its socket closed) is replaced the same way, and its batch is retried once on another worker,
    so a worker that died while idle costs the next batch nothing. Until a replacement is ready,
    `running` is below `processes`: /readyz reports the capacity as degraded.

    `nice` lowers the workers' CPU priority: when the cores are oversubscribed the event loop, which
    parses requests and feeds the batcher, runs first, so images reach the queue sooner and the
    forwards run on fuller batches (ResNet18 reads its 45 MB of weights once per forward, so on a
    CPU its cost per image falls steeply with the batch)."""

    def __init__(self, config: WorkerConfig, processes: int, timeout_s: float = 20.0) -> None:
        self.config = config
        self.processes = processes
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")  # no fork: torch and threads do not mix with it
        self._idle: deque[_Worker] = deque()
        self._changed: asyncio.Condition | None = None  # notified when a worker becomes idle
        self._all: list[_Worker] = []
        self._replacing: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None
        self._closed = False
        self._started = False

    @property
    def running(self) -> int:
        """Workers alive and answering (not counting replacements still loading)."""
        return len(self._all)

    @property
    def answering(self) -> int:
        """Running workers that are idle or whose current batch is younger than a quarter of the
        timeout: a frozen worker stops counting seconds after it froze, long before the watchdog
        replaces it (the slowest legitimate forward, a few street frames, takes a second or two)."""
        now, stall_s = time.monotonic(), self.timeout_s / 4
        return sum(1 for w in self._all if w.busy_since is None or w.swapping or now - w.busy_since < stall_s)

    def backends(self, name: str) -> list[str]:
        """What each running worker runs model `name` on, as it reported when it loaded."""
        return [worker.runs.get(name, "?") for worker in self._all]

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.config), name="signserve-forward",
                                        daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _await_ready(self, worker: _Worker) -> None:
        # polled, not a blocking recv: a pool closing while a replacement loads (seconds) must not
        # wait for that load before it can stop
        while not worker.conn.poll(0.1):
            if self._closed:
                raise PoolClosed("the pool closed while a forward worker was loading")
        try:
            status, detail = worker.conn.recv()
        except EOFError:
            raise WorkerDied(f"forward worker exited with {worker.process.exitcode} while loading") from None
        if status != "ready":
            raise WorkerDied(f"forward worker could not load the models: {detail}")
        worker.runs = detail

    def _start_one(self) -> _Worker:
        worker = self._spawn()
        try:
            self._await_ready(worker)
        except BaseException:
            worker.process.kill()
            raise
        return worker

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
        self._started = True

    def forward(self, name: str) -> Callable[[torch.Tensor], Awaitable[Answers]]:
        async def run(images: torch.Tensor) -> Answers:
            return await self.run(name, images)

        return run

    def start_watchdog(self) -> None:
        """Start pinging idle workers (call it on the loop that runs the forwards, after `start`)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="forward-watchdog")

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _take(self) -> _Worker:
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self._idle or self._closed)
            if self._closed:
                raise WorkerDied("the forward workers are shutting down")
            return self._idle.popleft()

    async def _take_this(self, worker: _Worker) -> bool:
        """Wait until `worker` is idle and take it; False when it was retired first."""
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: worker in self._idle or worker not in self._all or self._closed)
            if self._closed:
                raise WorkerDied("the forward workers are shutting down")
            if worker not in self._idle:
                return False
            self._idle.remove(worker)
            return True

    async def _give_back(self, worker: _Worker) -> None:
        changed = self._condition()
        async with changed:
            if not self._closed:
                self._idle.append(worker)
                changed.notify_all()  # a swap may wait for this very worker

    async def run(self, name: str, images: torch.Tensor) -> Answers:
        """One batch on an idle worker. Cancelling the caller does not cancel the exchange: the
        worker's answer is still read, so it can never be taken for the next batch's."""
        if not self._started or self._closed:
            raise WorkerDied("no forward worker is running")
        message = (name, tuple(images.shape), images.contiguous().numpy().tobytes())
        for attempt in range(2):
            worker = await self._take()
            exchange = asyncio.get_running_loop().create_task(self._exchange(worker, message))
            try:
                status, result = await asyncio.shield(exchange)
            except WorkerDied:
                if attempt == 0 and len(self._all) > 0:
                    continue  # on another worker (or the replacement, once it is ready)
                raise
            if status != "ok":
                raise RuntimeError(f"forward failed in the worker: {result}")
            return result
        raise AssertionError("unreachable")

    async def swap(self, name: str, record: BackendRecord, timeout_s: float = 300) -> None:
        """Serve model `name` on `record` from now on: each worker in turn loads and warms it between two
        batches while the others answer; replacements start on it."""
        self.config = replace(self.config, backends={**self.config.backends, name: record.to_dict()})
        for worker in list(self._all):
            if not await self._take_this(worker):
                continue  # retired meanwhile: its replacement starts on the new runtime
            worker.swapping = True
            try:
                status, label = await self._exchange(worker, (SWAP, name, record.to_dict()), timeout_s)
            finally:
                worker.swapping = False
            if status != "ok":
                raise RuntimeError(f"a forward worker could not load {record.label} for {name}: {label}")
            worker.runs[name] = label

    async def _exchange(self, worker: _Worker, message: object, timeout_s: float | None = None) -> tuple[str, object]:
        """Send one message and read the answer; the worker goes back to the idle ones, or is retired."""
        worker.busy_since = time.monotonic()
        timeout_s = timeout_s or self.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await worker.streams()
                payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
                writer.writelines([_FRAME.pack(len(payload)), payload])
                await writer.drain()
                [size] = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                answer = pickle.loads(await reader.readexactly(size))
        except TimeoutError:
            self._retire(worker, f"did not answer within {timeout_s:g} s")
            raise WorkerHung(f"the forward worker did not answer within {timeout_s:g} s; it has been "
                             f"replaced") from None
        except (EOFError, OSError):  # IncompleteReadError is an EOFError
            self._retire(worker, "died")
            raise WorkerDied("a forward worker died during this batch; it has been restarted") from None
        worker.busy_since = None
        await self._give_back(worker)
        return answer

    def _retire(self, worker: _Worker, why: str) -> None:
        """Kill `worker` and start its replacement in the background."""
        log.error("forward worker %s %s; starting another", worker.process.pid, why)
        if worker in self._all:
            self._all.remove(worker)
        worker.close_streams()
        worker.process.kill()
        worker.conn.close()
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._replace(worker))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: _Worker) -> None:
        await asyncio.to_thread(dead.process.join, 5)  # reap it: no zombie left behind
        delay = 0.5
        while not self._closed:
            try:
                worker = await asyncio.to_thread(self._start_one)
            except PoolClosed:
                return
            except Exception as exc:  # keep trying: a transient failure must not shrink the pool for good
                log.error("a replacement forward worker failed to start: %s; retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
                continue
            if self._closed:
                worker.process.kill()
                return
            self._all.append(worker)
            await self._give_back(worker)
            log.info("forward worker %s ready (%d of %d running)", worker.process.pid, self.running, self.processes)
            return

    async def _watch(self) -> None:
        """Ping each idle worker every timeout_s / 2; one that is dead or does not answer is replaced."""
        while not self._closed:
            await asyncio.sleep(self.timeout_s / 2)
            for worker in list(self._idle):
                if self._closed or worker not in self._idle:
                    continue
                self._idle.remove(worker)
                try:
                    await self._exchange(worker, PING)
                except (WorkerDied, WorkerHung):
                    pass  # retired, its replacement on the way

    async def close(self, timeout_s: float = 5) -> None:
        """Stop every worker (call it on the loop that ran the forwards)."""
        self._closed = True
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._replacing):
            task.cancel()
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
