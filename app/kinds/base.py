"""The contract of a model kind, in the spirit of LitServe's LitAPI and TorchServe's handlers.

A kind says, for the checkpoints that are of it, everything the engine, the routes, the bench and
the page need to know: how an upload is decoded, how items are batched, what the forward is and how
its runtime is chosen (sample inputs, parity rule, reference accuracy), the handler that runs it
(`run` and `warmup`), what its answers mean, how it is described in /v1/models, and the command that
trains one. `app.kinds` registers one instance per kind; nothing else compares kind names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from models.backends import BackendRecord, Forward, Job, load_forward
from models.calibration import RecognitionRule
from models.checkpoint import LoadedModel

if TYPE_CHECKING:
    from app.batching import DynamicBatcher
    from app.imaging import Decoder


def served_forward(module: torch.nn.Module, loaded: LoadedModel, *, half: bool, channels_last: bool,
                   backend: BackendRecord | None, threads: int | None) -> tuple[Forward, str]:
    """The forward a handler runs `module` with, and the label of what runs: the backend record's, or
    without one torch (fp16 on CUDA when `half`)."""
    if backend is None:
        backend = BackendRecord("torch", "fp16" if half and loaded.device.type == "cuda" else "fp32")
    return load_forward(backend, module, loaded.device, threads or torch.get_num_threads(),
                        channels_last=channels_last, name=loaded.name)


class Handler(Protocol):
    """Runs one model's forwards, in the service's process or in a forward worker (app.workers)."""

    backend: str  # the label of what really runs: the chosen runtime, or torch-fp32 where it failed to load

    def run(self, items: torch.Tensor) -> list:
        """One collated batch -> one plain-data answer per item (no tensors: answers cross processes)."""

    def warmup(self, max_batch_size: int) -> None:
        """Run the batch shapes the service will send once, so no request pays for lazy set-up."""


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    instances: int  # forwards of this model that may run at once
    collate: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack


@dataclass(frozen=True)
class SelectionJob:
    """What choosing a runtime for a model runs: the module to export (what the handler runs) and the
    job of models.backends.select (sample inputs, parity rule, accuracy on real data)."""

    module: nn.Module
    job: Job


@dataclass
class ServedModel:
    name: str
    kind: "ModelKind"
    loaded: LoadedModel | None  # its checkpoint; None for a model composed of others (the ensemble)
    batcher: "DynamicBatcher | None"  # None when other models' batchers run it
    load_seconds: float
    predictor: Handler | None = None  # the in-process handler; None when forward workers run it
    backend: BackendRecord | None = None  # what runs the forward, and why (models.backends)
    members: list["ServedModel"] = field(default_factory=list)  # a composed model's parts
    choosing: bool = False  # a runtime choice for it is running in the background

    @property
    def runners(self) -> list["ServedModel"]:
        """The served models whose forwards answer for this one: itself, or its members."""
        return self.members or [self]

    @property
    def class_names(self) -> list[str]:
        return self.runners[0].loaded.class_names

    @property
    def rule(self) -> RecognitionRule:
        return self.kind.rule(self)

    @property
    def test_accuracy(self) -> float | None:
        return self.kind.test_accuracy(self)

    @property
    def training_metrics(self) -> list[dict]:
        return self.loaded.metrics if self.loaded is not None else []


class ModelKind:
    """The defaults suit a checkpoint-backed model with batched forwards; a kind overrides the rest."""

    name: str = ""  # set by app.kinds.register
    classifies: ClassVar[bool] = False  # answers POST /v1/predict
    names_boxes: ClassVar[bool] = False  # can name the boxes of POST /v1/detect
    finds_boxes: ClassVar[bool] = False  # finds the signs of POST /v1/detect
    trainer: ClassVar[str | None] = None  # the command that trains one

    # --- serving a checkpoint -------------------------------------------------------------------
    def handler(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                backend: BackendRecord | None = None, threads: int | None = None) -> Handler:
        raise NotImplementedError

    def batching(self, loaded: LoadedModel, max_batch_size: int, instances: int) -> Batching:
        return Batching(max_batch_size, instances)

    def decoder(self, loaded: LoadedModel) -> "Decoder":
        """How an upload becomes one item of this model's batches."""
        raise NotImplementedError

    def selection(self, loaded: LoadedModel, cache_dir: Path, batch_size: int, parity_images: int) -> SelectionJob:
        """What choosing this model's runtime checks and times (models.backends.select)."""
        raise NotImplementedError

    # --- models composed of others ----------------------------------------------------------------
    def compose(self, served: dict[str, ServedModel]) -> list[ServedModel]:
        """Models of this kind built from the served ones (none by default)."""
        return []

    def combine(self, per_runner: list[list]) -> list:
        """Per item, the answer from its runners' answers (one runner: its own)."""
        return per_runner[0]

    # --- describing ---------------------------------------------------------------------------------
    def rule(self, served: ServedModel) -> RecognitionRule:
        return served.loaded.calibration.rule

    def test_accuracy(self, served: ServedModel) -> float | None:
        return served.loaded.test_accuracy

    def default_rank(self, served: ServedModel) -> float | None:
        """How strongly this model claims to be /v1/predict's default (None: never; highest wins)."""
        return None

    def describe(self, served: ServedModel) -> dict:
        """Fields of /v1/models' ModelInfo beyond the common ones."""
        return {}

    def layers(self, served: ServedModel) -> nn.Module:
        """The module whose conv/pool layers the receptive-field calculator reads."""
        return served.loaded.model
