"""What the app serves: the checkpoints of the checkpoint directory, each with its predictor and batcher.

Loading runs in a background thread after start-up, so /healthz answers at once and /readyz turns
200 when every model is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.batching import DynamicBatcher, ForwardFn
from app.decoding import DecodeBudget
from app.engine import DetectorPredictor, Predictor, choose_backend, make_predictor, select_device
from app.observability import ServiceMetrics
from app.schemas.health import SkippedCheckpoint
from app.settings import Settings, available_cores
from app.workers import WorkerPool
from models.backends import BackendRecord
from models.calibration import Calibration
from models.checkpoint import LoadedModel, load_checkpoint, served_checkpoints
from models.detector import pad_stack
from models.ensemble import ENSEMBLE_NAME

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


# A frame is ~1 Mpx: a few per forward already fill the cores, and a larger batch only holds the
# first frame's answer back.
DETECTOR_MAX_BATCH = 4


def batching_for(model: LoadedModel, max_batch_size: int, instances: int) -> dict:
    """The batcher's per-kind settings. A detector's frames of unequal sizes are padded into one batch,
    and its forwards (a second or more for a few frames) may hold all instances but one: the last is
    left to the classifiers, whose batches take milliseconds and would otherwise queue behind frames."""
    if model.architecture != "detector":
        return {"max_batch_size": max_batch_size, "instances": instances}
    return {"max_batch_size": min(max_batch_size, DETECTOR_MAX_BATCH), "instances": max(1, instances - 1),
            "collate": lambda frames: pad_stack(frames, model.preprocessing)}


@dataclass
class ServedModel:
    loaded: LoadedModel
    batcher: DynamicBatcher | None  # None for an ensemble: its members' batchers run it
    load_seconds: float
    predictor: Predictor | DetectorPredictor | None = None  # the in-process forward; None in worker processes
    backend: BackendRecord | None = None  # what runs the forward, and why (models.backends)
    members: list["ServedModel"] = field(default_factory=list)  # an ensemble's members

    @property
    def runners(self) -> list["ServedModel"]:
        """The served models whose forwards answer for this one: itself, or an ensemble's members."""
        return self.members or [self]


def ensemble_model(models: dict[str, LoadedModel]) -> LoadedModel | None:
    """The ensemble that the served models' checkpoints describe (training.calibrate writes the same
    description into each member), when every member is served and they agree; else None."""
    specs = [m.ensemble for m in models.values() if m.ensemble is not None]
    if not specs:
        return None
    spec = specs[0]
    members = [models.get(name) for name in spec.members]
    if any(m is None or m.ensemble != spec for m in members):
        log.warning("not serving the ensemble: its members %s are not all served with the same calibration run",
                    ", ".join(spec.members))
        return None
    first = members[0]
    return LoadedModel(
        name=ENSEMBLE_NAME, model=nn.ModuleList(m.model for m in members), architecture=ENSEMBLE_NAME,
        class_names=first.class_names, preprocessing=max((m.preprocessing for m in members),
                                                         key=lambda p: p.input_size),
        start_weights=" + ".join(spec.members), metrics=[], train_args={}, data={},
        sha256=hashlib.sha256("".join(m.sha256 for m in members).encode()).hexdigest(), path=first.path.parent,
        device=first.device, parameters=sum(m.parameters for m in members),
        calibration=Calibration(rule=spec.rule, report=spec.report), ensemble=spec)


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

    def __post_init__(self) -> None:
        self.decode_budget = DecodeBudget(self.settings.max_request_pixels, self.settings.max_decoding_pixels)

    def skipped(self) -> list[SkippedCheckpoint]:
        return [SkippedCheckpoint(file=file, reason=reason) for file, reason in self.load_errors.items()]

    def best(self, accepts: Callable[[ServedModel], bool] = lambda m: True) -> str | None:
        """The default for /v1/predict (among the models `accepts` takes): the ensemble when it beat
        each of its members on validation data (training.calibrate decides), else the classifier with
        the highest final test accuracy."""
        ensemble = self.models.get(ENSEMBLE_NAME)
        if ensemble is not None and ensemble.loaded.ensemble is not None and \
                ensemble.loaded.ensemble.report.get("default") and accepts(ensemble):
            return ENSEMBLE_NAME
        classifiers = [n for n, m in self.models.items()
                       if m.loaded.architecture not in ("detector", ENSEMBLE_NAME) and accepts(m)]
        if not classifiers:
            return None
        return max(classifiers, key=lambda n: self.models[n].loaded.test_accuracy or 0.0)

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

    def _load_one(self, path: Path) -> tuple[LoadedModel, BackendRecord, Predictor | DetectorPredictor | None]:
        s = self.settings
        loaded = load_checkpoint(path, device=self.device, name=path.stem)
        threads = self.plan.torch_threads or torch.get_num_threads()
        backend = choose_backend(loaded, s.backend, cache_dir=s.backend_cache_dir, batch_size=s.max_batch_size,
                                 parity_images=s.backend_parity_images, threads=threads, half=s.half)
        if self.plan.processes:
            return loaded, backend, None  # metadata here; the workers load their own copy to run
        predictor = make_predictor(loaded, half=s.half, channels_last=s.channels_last, backend=backend,
                                   threads=threads)
        if s.warmup:
            predictor.warmup(s.max_batch_size)
        return loaded, backend, predictor

    async def load(self, paths: list[Path]) -> None:
        s, plan = self.settings, self.plan
        loaded: dict[str, tuple[LoadedModel, BackendRecord, Predictor | None, float, Path]] = {}
        for path in paths:
            started = time.perf_counter()
            try:
                model, backend, predictor = await asyncio.to_thread(self._load_one, path)
            except Exception as exc:  # one bad file must not take the other models down
                log.error("skipping checkpoint %s: %s", path, exc)
                self.load_errors[path.name] = str(exc)
                continue
            loaded[model.name] = (model, backend, predictor, time.perf_counter() - started, path)
        pool_seconds = 0.0
        if plan.processes and loaded:
            started = time.perf_counter()
            self.workers = worker_pool(s, plan, self.device, {name: path for name, (_, _, _, _, path) in loaded.items()},
                                       {name: backend for name, (_, backend, _, _, _) in loaded.items()})
            try:
                await asyncio.to_thread(self.workers.start)
                self.workers.start_watchdog()
            except Exception as exc:
                log.error("the forward workers did not start: %s", exc)
                self.load_errors["workers"] = str(exc)
                return
            pool_seconds = time.perf_counter() - started
        for name, (model, backend, predictor, seconds, path) in loaded.items():
            try:
                self._serve(name, model, backend, predictor, seconds + pool_seconds)
            except Exception as exc:  # whatever it is, it is this model's problem, not the others'
                log.error("skipping checkpoint %s: %s", path, exc)
                self.load_errors[path.name] = f"{type(exc).__name__}: {exc}"
        ensemble = ensemble_model({name: m.loaded for name, m in self.models.items()})
        if ensemble is not None:
            members = [self.models[name] for name in ensemble.ensemble.members]
            self.models[ensemble.name] = ServedModel(ensemble, None, 0.0, members=members)
            log.info("serving %s: the mean of the calibrated probabilities of %s (test accuracy %s)",
                     ensemble.name, ", ".join(ensemble.ensemble.members), ensemble.test_accuracy)
        # What exists now (torch, FastAPI, the models: ~420k objects) lives as long as the process.
        # Frozen, the collector's full passes skip it; unfrozen, each walked it all (~190 ms measured,
        # the event loop stalled meanwhile).
        gc.freeze()
        self.ready = bool(self.models)
        if not self.ready:
            log.error("no model could be loaded; /readyz stays 503")

    def _serve(self, name: str, model: LoadedModel, backend: BackendRecord,
               predictor: Predictor | DetectorPredictor | None, seconds: float) -> None:
        s, plan = self.settings, self.plan
        batcher = DynamicBatcher(self.forward_path(name, predictor), max_wait_s=s.max_wait_ms / 1000,
                                 queue_size=s.queue_size, name=name, on_batch=self.metrics.batch_observer(name),
                                 **batching_for(model, s.max_batch_size, plan.instances))
        batcher.start()
        self.models[name] = ServedModel(model, batcher, seconds, predictor, backend)
        self.metrics.model_load_seconds.labels(name).set(seconds)
        self.metrics.queue_depth.labels(name).set_function(lambda b=batcher: b.depth)
        self.metrics.model_info.labels(name, model.architecture, str(model.device), model.sha256,
                                       backend.backend, backend.precision).set(1)
        self.metrics.watch_device(model.device)
        log.info("serving %s (%s, %d parameters, test accuracy %s) on %s, ready in %.2f s", name,
                 model.architecture, model.parameters, model.test_accuracy, model.device, seconds)
        log.info("%s runs on %s%s: %s; bare forward images/s %s; rejected %s; test accuracy %s", name,
                 backend.label, " (cached choice)" if backend.cached else f" (chosen in {backend.selected_in_s} s)",
                 backend.reason, backend.images_per_s or "-", backend.rejected or "-", backend.test_accuracy or "-")

    def running_backends(self, name: str) -> list[str]:
        """What really runs model `name`'s forwards: each worker's report, or this process's handler."""
        served = self.models.get(name)
        if served is None or served.batcher is None:
            return []
        if self.workers is not None:
            return self.workers.backends(name)
        return [served.predictor.backend] if served.predictor is not None else []

    def forward_path(self, name: str, predictor: Predictor | DetectorPredictor | None) -> ForwardFn:
        """What the batcher calls with each batch of model `name` (uint8 images -> per image, the
        handler's answer: a classifier's class ids and probabilities, most probable first, or the
        detector's boxes): on the CPU by default an exchange with a forward worker process
        (app.workers.WorkerPool.run, which runs the handler's `run` there: app.engine.Predictor.ranked
        or DetectorPredictor.run); otherwise this process's own handler, in the batcher's threads."""
        return self.workers.forward(name) if self.workers is not None else predictor.run

    async def close(self) -> None:
        self.ready = False
        for served in self.models.values():
            if served.batcher is not None:
                await served.batcher.stop()
        if self.workers is not None:
            await self.workers.close()
