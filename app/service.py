"""What the app serves: the checkpoints of the checkpoint directory, each with its predictor and batcher.

Loading runs in a background thread after start-up, so /healthz answers at once and /readyz turns
200 when every model is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.batching import DynamicBatcher
from app.engine import Predictor, select_device
from app.observability import ServiceMetrics
from app.registry import ModelRegistry
from app.settings import Settings, available_cores
from models.checkpoint import LoadedModel, load_checkpoint

log = logging.getLogger("signserve")


def checkpoint_paths(directory: Path) -> list[Path]:
    """The served checkpoints: every *.pt except resume-state files."""
    return sorted(p for p in Path(directory).glob("*.pt") if not p.name.endswith(".state.pt"))


def execution_plan(settings: Settings, device: torch.device) -> tuple[int, int | None]:
    """(forward instances per model, torch intra-op threads or None for torch's default).

    On the CPU the cores are split between single-purpose instances rather than one wide forward:
    two 1-thread forwards on 2 cores keep both busy without OpenMP barriers that stall whenever the
    event loop (HTTP, decoding) takes a core for a moment. On CUDA one instance feeds the GPU.
    """
    if device.type == "cuda":
        return settings.instances or 1, settings.torch_threads
    cores = available_cores()
    instances = settings.instances or min(2, cores)
    return instances, settings.torch_threads or max(1, cores // instances)


@dataclass
class ServedModel:
    loaded: LoadedModel
    predictor: Predictor
    batcher: DynamicBatcher
    load_seconds: float


@dataclass
class Service:
    settings: Settings
    metrics: ServiceMetrics
    device: torch.device | None = None
    models: dict[str, ServedModel] = field(default_factory=dict)
    registry: ModelRegistry = field(default_factory=lambda: ModelRegistry({}))
    load_errors: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    instances: int = 1

    def check_startup(self) -> list[Path]:
        """Fail start-up at once on what no waiting fixes: no checkpoints, or an impossible device."""
        paths = checkpoint_paths(self.settings.checkpoint_dir)
        if not paths:
            raise RuntimeError(f"no *.pt checkpoints in {self.settings.checkpoint_dir} "
                               "(set SIGNSERVE_CHECKPOINT_DIR, or train one with `make train`)")
        self.device = select_device(self.settings.device)
        self.instances, threads = execution_plan(self.settings, self.device)
        if threads:
            torch.set_num_threads(threads)
        log.info("device %s, %d forward instance(s) per model, %d torch thread(s)", self.device, self.instances,
                 torch.get_num_threads())
        return paths

    def _load_one(self, path: Path) -> tuple[LoadedModel, Predictor]:
        loaded = load_checkpoint(path, device=self.device, name=path.stem)
        predictor = Predictor(loaded, half=self.settings.half, channels_last=self.settings.channels_last)
        if self.settings.warmup:
            predictor.warmup(self.settings.max_batch_size)
        return loaded, predictor

    async def load(self, paths: list[Path]) -> None:
        s = self.settings
        for path in paths:
            started = time.perf_counter()
            try:
                loaded, predictor = await asyncio.to_thread(self._load_one, path)
            except Exception as exc:  # one bad file must not take the other models down
                log.error("skipping checkpoint %s: %s", path, exc)
                self.load_errors[path.name] = str(exc)
                continue
            seconds = time.perf_counter() - started
            name = loaded.name
            batcher = DynamicBatcher(predictor.ranked, max_batch_size=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000,
                                     queue_size=s.queue_size, instances=self.instances, name=name,
                                     on_batch=self.metrics.batch_observer(name))
            batcher.start()
            self.models[name] = ServedModel(loaded, predictor, batcher, seconds)
            self.metrics.model_load_seconds.labels(name).set(seconds)
            self.metrics.queue_depth.labels(name).set_function(lambda b=batcher: b.depth)
            self.metrics.model_info.labels(name, loaded.architecture, str(loaded.device), loaded.sha256).set(1)
            self.metrics.watch_device(loaded.device)
            log.info("loaded %s (%s, %d parameters, test accuracy %s) on %s in %.2f s", name, loaded.architecture,
                     loaded.parameters, loaded.test_accuracy, loaded.device, seconds)
        self.registry = ModelRegistry({name: m.loaded for name, m in self.models.items()})
        self.ready = bool(self.models)
        if not self.ready:
            log.error("no model could be loaded; /readyz stays 503")

    async def close(self) -> None:
        self.ready = False
        for served in self.models.values():
            await served.batcher.stop()
