"""What the app serves: the checkpoints of the checkpoint directory, each with its handler and batcher.

Loading runs in the background after start-up, so /healthz answers at once, and /readyz turns 200
once every model is loaded and warmed up on torch. Each model's faster runtime (models.backends) is
then chosen in the background and swapped in; until it is, torch answers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.batching import DynamicBatcher, ForwardFn
from app.decoding import DecodeBudget
from app.engine import choose_backend, select_device, torch_record
from app.kinds import KINDS, ServedModel, kind_of
from app.kinds.base import Handler
from app.observability import ServiceMetrics
from app.schemas.health import SkippedCheckpoint
from app.settings import Settings, available_cores
from app.workers import WorkerPool
from models.backends import BackendRecord
from models.checkpoint import LoadedModel, load_checkpoint, served_checkpoints

log = logging.getLogger("signserve")


@dataclass(frozen=True)
class ExecutionPlan:
    instances: int  # forward passes that may run at once per model
    torch_threads: int | None  # intra-op threads per forward; None: torch's default
    processes: bool  # forwards in worker processes (app.workers) rather than threads of this one


def execution_plan(settings: Settings, device: torch.device) -> ExecutionPlan:
    """How forwards run. On the CPU the cores are split between single-threaded instances rather
    than one wide forward (OpenMP barriers stall whenever the event loop takes a core for a moment),
    and the instances are worker processes, so they never wait for the event loop's GIL. On CUDA
    one in-process forward feeds the GPU."""
    if device.type == "cuda":
        return ExecutionPlan(settings.instances or 1, settings.torch_threads, bool(settings.worker_processes))
    cores = available_cores()
    instances = settings.instances or min(2, cores)
    processes = True if settings.worker_processes is None else settings.worker_processes
    return ExecutionPlan(instances, settings.torch_threads or max(1, cores // instances), processes)


def worker_pool(settings: Settings, plan: ExecutionPlan, device: torch.device, paths: dict[str, Path],
                backends: dict[str, BackendRecord] | None = None) -> WorkerPool:
    """The forward worker processes for these checkpoints (model name -> path), each on its chosen
    backend (torch when none is given), as the settings ask."""
    config = WorkerPool.config_for(paths, device, half=settings.half, channels_last=settings.channels_last,
                                   threads=plan.torch_threads or 1,
                                   warmup_batch_size=settings.max_batch_size if settings.warmup else None,
                                   nice=settings.worker_nice, backends=backends)
    return WorkerPool(config, plan.instances, timeout_s=settings.worker_timeout_s)


def in_daemon_thread(fn: Callable, *args, **kwargs) -> asyncio.Future:
    """`fn` in a thread of its own that does not hold up the process's exit: a runtime choice (minutes
    of export and timing) must not keep a stopping service waiting, as the default executor would."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task
            outcome = (lambda e=exc: future.set_exception(e))
        else:
            outcome = (lambda r=result: future.set_result(r))
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop has closed: nobody waits for it any more
            pass

    threading.Thread(target=run, name="runtime-choice", daemon=True).start()
    return future


@dataclass
class Service:
    settings: Settings
    metrics: ServiceMetrics
    device: torch.device | None = None
    plan: ExecutionPlan | None = None
    models: dict[str, ServedModel] = field(default_factory=dict)  # by name: the checkpoint file's stem
    load_errors: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    workers: WorkerPool | None = None
    decode_budget: DecodeBudget = field(init=False)
    choosing: asyncio.Task | None = None  # the background runtime choice

    def __post_init__(self) -> None:
        self.decode_budget = DecodeBudget(self.settings.max_request_pixels, self.settings.max_decoding_pixels)

    def skipped(self) -> list[SkippedCheckpoint]:
        return [SkippedCheckpoint(file=file, reason=reason) for file, reason in self.load_errors.items()]

    def best(self, accepts: Callable[[ServedModel], bool] = lambda m: m.kind.classifies) -> str | None:
        """The default model among those `accepts` takes (by default /v1/predict's): the one whose kind
        ranks it highest (an ensemble that beat its members on validation data, else the classifier
        with the highest final test accuracy)."""
        ranked = [(rank, name) for name, m in self.models.items()
                  if accepts(m) and (rank := m.kind.default_rank(m)) is not None]
        return max(ranked)[1] if ranked else None

    def check_startup(self) -> list[Path]:
        """Fail start-up at once on what no waiting fixes: no checkpoints, or an impossible device."""
        paths = served_checkpoints(self.settings.checkpoint_dir)
        if not paths:
            raise RuntimeError(f"no *.pt checkpoints in {self.settings.checkpoint_dir} "
                               "(set SIGNSERVE_CHECKPOINT_DIR, or train one with `make train`)")
        self.device = select_device(self.settings.device)
        self.plan = plan = execution_plan(self.settings, self.device)
        if plan.processes:
            torch.set_num_threads(1)  # this process only converts decoded images to tensors
        elif plan.torch_threads:
            torch.set_num_threads(plan.torch_threads)
        log.info("device %s; %d forward instance(s) per model in %s, %s torch thread(s) each", self.device,
                 plan.instances, "worker processes" if plan.processes else "threads",
                 plan.torch_threads or torch.get_num_threads())
        return paths

    @property
    def threads(self) -> int:
        return self.plan.torch_threads or torch.get_num_threads()

    def handler(self, loaded: LoadedModel, backend: BackendRecord) -> Handler:
        """An in-process handler for `loaded` on `backend`, warmed up as the settings ask."""
        s = self.settings
        handler = kind_of(loaded).handler(loaded, half=s.half, channels_last=s.channels_last, backend=backend,
                                          threads=self.threads)
        if s.warmup:
            handler.warmup(s.max_batch_size)
        return handler

    def _load_one(self, path: Path) -> tuple[LoadedModel, BackendRecord, Handler | None]:
        loaded = load_checkpoint(path, device=self.device, name=path.stem)
        kind_of(loaded)  # a kind nobody registered fails here, for this checkpoint only
        backend = torch_record(loaded, self.threads, self.settings.half, "serving at once; the faster runtime is "
                                                                         "chosen in the background")
        if self.plan.processes:
            return loaded, backend, None  # metadata here; the workers load their own copy to run
        return loaded, backend, self.handler(loaded, backend)

    async def load(self, paths: list[Path]) -> None:
        s, plan = self.settings, self.plan
        loaded: dict[str, tuple[LoadedModel, BackendRecord, Handler | None, float, Path]] = {}
        for path in paths:
            started = time.perf_counter()
            try:
                model, backend, handler = await asyncio.to_thread(self._load_one, path)
            except Exception as exc:  # one bad file must not take the other models down
                log.error("skipping checkpoint %s: %s", path, exc)
                self.load_errors[path.name] = str(exc)
                continue
            loaded[model.name] = (model, backend, handler, time.perf_counter() - started, path)
        pool_seconds = 0.0
        if plan.processes and loaded:
            started = time.perf_counter()
            self.workers = worker_pool(s, plan, self.device, {name: path for name, (_, _, _, _, path) in loaded.items()})
            try:
                await asyncio.to_thread(self.workers.start)
                self.workers.start_watchdog()
            except Exception as exc:
                log.error("the forward workers did not start: %s", exc)
                self.load_errors["workers"] = str(exc)
                return
            pool_seconds = time.perf_counter() - started
        for name, (model, backend, handler, seconds, path) in loaded.items():
            try:
                self.serve(model, backend, handler, seconds + pool_seconds)
            except Exception as exc:  # whatever it is, it is this model's problem, not the others'
                log.error("skipping checkpoint %s: %s", path, exc)
                self.load_errors[path.name] = f"{type(exc).__name__}: {exc}"
        for kind in KINDS.values():
            for composed in kind.compose(self.models):
                self.models[composed.name] = composed
        # What exists now (torch, FastAPI, the models: ~420k objects) lives as long as the process.
        # Frozen, the collector's full passes skip it; unfrozen, each walked it all (~190 ms measured,
        # the event loop stalled meanwhile).
        gc.freeze()
        self.ready = bool(self.models)
        if not self.ready:
            log.error("no model could be loaded; /readyz stays 503")
            return
        self.choosing = asyncio.get_running_loop().create_task(self.choose_runtimes(), name="runtime-choice")

    def serve(self, model: LoadedModel, backend: BackendRecord, handler: Handler | None, seconds: float) -> ServedModel:
        """Serve a loaded checkpoint: its batcher over `handler` (None: the forward workers run it)."""
        s, plan, name, kind = self.settings, self.plan, model.name, kind_of(model)
        batching = kind.batching(model, s.max_batch_size, plan.instances)
        batcher = DynamicBatcher(self.forward_path(name, handler), max_wait_s=s.max_wait_ms / 1000,
                                 queue_size=s.queue_size, name=name, on_batch=self.metrics.batch_observer(name),
                                 max_batch_size=batching.max_batch_size, instances=batching.instances,
                                 collate=batching.collate)
        batcher.start()
        served = self.models[name] = ServedModel(name, kind, model, batcher, seconds, handler, backend,
                                                 choosing=s.backend != "torch" and model.device.type == "cpu")
        self.metrics.model_load_seconds.labels(name).set(seconds)
        self.metrics.queue_depth.labels(name).set_function(lambda b=batcher: b.depth)
        self.metrics.show_backend(name, model, backend)
        self.metrics.watch_device(model.device)
        log.info("serving %s (%s %s, %d parameters, test accuracy %s) on %s with %s, ready in %.2f s", name,
                 kind.name, model.architecture, model.parameters, model.test_accuracy, model.device, backend.label,
                 seconds)
        return served

    async def choose_runtimes(self) -> None:
        """Choose each model's runtime (models.backends.select: cached, or exported, checked and timed
        now) and swap it in. Requests keep being answered throughout: the workers swap one at a time,
        each between two batches, and an in-process handler is replaced between two batches."""
        s = self.settings
        for served in [m for m in self.models.values() if m.choosing]:
            loaded = served.loaded
            try:
                record = await in_daemon_thread(
                    choose_backend, loaded, s.backend, cache_dir=s.backend_cache_dir, batch_size=s.max_batch_size,
                    parity_images=s.backend_parity_images, threads=self.threads, half=s.half)
                if record.label != served.backend.label:
                    await self.swap(served, record)
                else:
                    served.backend = record
            except Exception as exc:  # the model goes on being served as it is
                log.error("%s: the runtime choice failed (%s: %s); %s serves on", served.name,
                          type(exc).__name__, exc, served.backend.label)
            finally:
                served.choosing = False
            record = served.backend
            log.info("%s runs on %s%s: %s; bare forward images/s %s; rejected %s; test accuracy %s", served.name,
                     record.label, " (cached choice)" if record.cached else f" (chosen in {record.selected_in_s} s)",
                     record.reason, record.images_per_s or "-", record.rejected or "-", record.test_accuracy or "-")

    async def swap(self, served: ServedModel, record: BackendRecord) -> None:
        """Serve `served` on `record` from now on."""
        if self.workers is not None:
            await self.workers.swap(served.name, record)
        else:
            handler = await asyncio.to_thread(self.handler, served.loaded, record)
            served.predictor = handler
            served.batcher.forward = handler.run
        served.backend = record
        self.metrics.show_backend(served.name, served.loaded, record)

    def running_backends(self, name: str) -> list[str]:
        """What really runs model `name`'s forwards: each worker's report, or this process's handler."""
        served = self.models.get(name)
        if served is None or served.batcher is None:
            return []
        if self.workers is not None:
            return self.workers.backends(name)
        return [served.predictor.backend] if served.predictor is not None else []

    def forward_path(self, name: str, handler: Handler | None) -> ForwardFn:
        """What the batcher calls with each collated batch of model `name` (-> per item, the handler's
        answer): on the CPU by default an exchange with a forward worker process (app.workers, which
        runs the kind's handler there); otherwise this process's own handler, in the batcher's threads."""
        return self.workers.forward(name) if self.workers is not None else handler.run

    async def close(self) -> None:
        self.ready = False
        if self.choosing is not None:
            self.choosing.cancel()
        for served in self.models.values():
            if served.batcher is not None:
                await served.batcher.stop()
        if self.workers is not None:
            await self.workers.close()
