"""The checkpoint format, written by training and read by serving and evaluation.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`: a file that smuggles arbitrary pickled objects is refused.

    {
      "format": "signserve-checkpoint", "format_version": 1,
      "architecture": "cnn" | "resnet18",
      "class_names": [43 str],
      "preprocessing": Preprocessing.to_dict(),
      "start_weights": "random" | "imagenet" | "imagenet:<file>",
      "epochs_completed": int,
      "metrics": [{"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}, ...],
      "train_args": {flag: value},
      "data": {"root", "train_samples", "test_samples", ...},
      "inference": {...},             # settings chosen after training, e.g. the detector's score_threshold
      "state_dict": {name: tensor},   # floating tensors may be stored in fp16 to halve the file
      "calibration": Calibration.to_dict(),  # optional: temperature, sign gate, recognition rule, figures
      "ensemble": EnsembleSpec.to_dict(),    # optional: the ensemble this model is a member of
    }

A checkpoint without "calibration" serves plain softmax probabilities (models.calibration.Calibration()).

Files are written atomically: a temp file in the same directory, fsync, then rename.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.atomic import atomic_save, atomic_write_text  # noqa: F401 (the checkpoint's writers)
from models.architectures import KIND_OF_ARCHITECTURE, build_model, classifier_head, count_parameters
from models.calibration import CalibratedClassifier, Calibration
from models.ensemble import EnsembleSpec
from models.preprocessing import INTERPOLATIONS, Preprocessing

FORMAT = "signserve-checkpoint"
FORMAT_VERSION = 1
# their metrics rows carry every METRIC_FIELDS entry
CLASSIFIER_ARCHITECTURES = tuple(a for a, kind in KIND_OF_ARCHITECTURE.items() if kind == "classifier")
METRIC_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds")
REQUIRED_KEYS = ("format", "format_version", "architecture", "class_names", "preprocessing", "state_dict")
RESUME_SUFFIX = ".state.pt"  # the trainer's optimizer/RNG state beside <name>.pt: not a servable checkpoint


class CheckpointError(ValueError):
    """The file is not a loadable signserve checkpoint (unsafe, corrupt or of another format)."""


def safe_load(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True; anything else than plain data raises CheckpointError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"refusing to load {path}: not a safe checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def make_checkpoint(model: nn.Module, *, architecture: str, class_names: list[str], preprocessing: Preprocessing,
                    start_weights: str, metrics: list[dict], train_args: dict, data: dict,
                    half: bool = False, inference: dict | None = None) -> dict:
    state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "start_weights": start_weights,
        "epochs_completed": len(metrics),
        "metrics": [dict(m) for m in metrics],
        "train_args": dict(train_args),
        "data": dict(data),
        "inference": dict(inference or {}),
        "state_dict": state,
    }


def served_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The servable checkpoints of a directory, by name: every *.pt except resume-state files."""
    return sorted(p for p in Path(directory).glob("*.pt") if not p.name.endswith(RESUME_SUFFIX))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class LoadedModel:
    """A checkpoint turned into a ready, eval-mode model on its device, with its metadata."""

    name: str
    model: nn.Module
    architecture: str
    class_names: list[str]
    preprocessing: Preprocessing
    start_weights: str
    metrics: list[dict]
    train_args: dict
    data: dict
    sha256: str
    path: Path
    device: torch.device
    parameters: int = field(default=0)
    calibration: Calibration = field(default_factory=Calibration)
    ensemble: EnsembleSpec | None = None
    inference: dict = field(default_factory=dict)
    kind: str = "classifier"  # how it is served (models.architectures.KIND_OF_ARCHITECTURE, app.kinds)

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics[-1].get("test_accuracy") if self.metrics else None  # None for the detector

    def calibrated(self) -> CalibratedClassifier:
        """A classifier with its calibration as one module: what is served, exported and evaluated."""
        return CalibratedClassifier(self.model, self.calibration)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metadata_problems(ckpt: dict) -> list[str]:
    """What is wrong with a checkpoint's metadata (empty when nothing): every field serving reads is
    checked here, so a malformed file is refused whole at load time, never half-served."""
    problems = []
    version = ckpt["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        problems.append(f"format_version is {version!r}, not an integer")
    names = ckpt["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problems.append("class_names is not a non-empty list of strings")
    if not isinstance(ckpt["architecture"], str):
        problems.append("architecture is not a string")
    if not isinstance(ckpt["state_dict"], dict) or not all(isinstance(v, torch.Tensor)
                                                           for v in ckpt["state_dict"].values()):
        problems.append("state_dict is not a dict of tensors")
    try:
        pre = Preprocessing.from_dict(ckpt["preprocessing"])
        if not 1 <= pre.input_size <= 4096 or len(pre.mean) != 3 or len(pre.std) != 3 \
                or not all(math.isfinite(v) for v in pre.mean + pre.std) or min(pre.std) <= 0:
            raise ValueError(f"{pre}")
        if pre.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {pre.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    except Exception as exc:  # from_dict raises KeyError, TypeError, ValueError on what it cannot read
        problems.append(f"preprocessing is malformed ({type(exc).__name__}: {exc})")
    for key, kind in (("start_weights", str), ("train_args", dict), ("data", dict), ("metrics", list)):
        if key in ckpt and not isinstance(ckpt[key], kind):
            problems.append(f"{key} is a {type(ckpt[key]).__name__}, not a {kind.__name__}")
    for key, parse in (("calibration", Calibration.from_dict), ("ensemble", EnsembleSpec.from_dict)):
        if ckpt.get(key) is not None:
            try:
                parse(ckpt[key]).check()
            except Exception as exc:  # KeyError, TypeError, ValueError, AttributeError on what it cannot read
                problems.append(f"{key} is malformed ({type(exc).__name__}: {exc})")
    required = METRIC_FIELDS if ckpt["architecture"] in CLASSIFIER_ARCHITECTURES else ("epoch",)
    for i, row in enumerate(ckpt.get("metrics", []) if isinstance(ckpt.get("metrics", []), list) else []):
        if not isinstance(row, dict):
            problems.append(f"metrics[{i}] is not a dict")
            continue
        missing = [k for k in required if k not in row]
        bad = [k for k in required if k in row and not _finite_number(row[k])]
        if missing or bad:
            what = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                ([f"has non-numeric {', '.join(bad)}"] if bad else [])
            problems.append(f"metrics[{i}] {'; '.join(what)}")
            break  # one malformed row says enough
    return problems


def validate(ckpt: dict, path: str | os.PathLike) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a signserve checkpoint (missing {missing or ['format']})")
    problems = metadata_problems(ckpt)
    if problems:
        raise CheckpointError(f"{path}: malformed metadata: {'; '.join(problems)}")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {ckpt['format_version']} is newer than this code "
                              f"understands ({FORMAT_VERSION})")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None) -> LoadedModel:
    """Load, check and instantiate a checkpoint; the model is in eval mode, fp32, on `device`."""
    path = Path(path)
    ckpt = safe_load(path)
    validate(ckpt, path)
    preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    try:
        model = build_model(ckpt["architecture"], num_classes=len(ckpt["class_names"]),
                            input_size=preprocessing.input_size)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {ckpt['architecture']!r}: {exc}") from exc
    calibration = Calibration.from_dict(ckpt.get("calibration"))
    if calibration.gate_weight is not None and ckpt["architecture"] in CLASSIFIER_ARCHITECTURES \
            and len(calibration.gate_weight) != classifier_head(model).in_features:
        raise CheckpointError(f"{path}: the sign gate has {len(calibration.gate_weight)} weights, the model's "
                              f"features {classifier_head(model).in_features}")
    device = torch.device(device)
    model.to(device).eval()
    return LoadedModel(
        name=name or path.stem,
        model=model,
        architecture=ckpt["architecture"],
        class_names=list(ckpt["class_names"]),
        preprocessing=preprocessing,
        start_weights=ckpt.get("start_weights", "unknown"),
        metrics=list(ckpt.get("metrics", [])),
        train_args=dict(ckpt.get("train_args", {})),
        data=dict(ckpt.get("data", {})),
        sha256=file_sha256(path),
        path=path,
        device=device,
        parameters=count_parameters(model),
        calibration=calibration,
        ensemble=EnsembleSpec.from_dict(ckpt["ensemble"]) if ckpt.get("ensemble") else None,
        inference=dict(ckpt.get("inference", {})),
        kind=KIND_OF_ARCHITECTURE[ckpt["architecture"]],
    )


def metrics_csv(metrics: list[dict], fields: tuple[str, ...] | None = None) -> str:
    """The per-epoch metrics as CSV text; columns `fields`, by default METRIC_FIELDS for a
    classifier (with online_test_accuracy before the seconds when it was trained with a weight average)
    and the first row's keys for any other model."""
    if fields is None:
        if not metrics or "test_accuracy" in metrics[0]:
            online = ("online_test_accuracy",) if metrics and "online_test_accuracy" in metrics[0] else ()
            fields = (*METRIC_FIELDS[:-1], *online, METRIC_FIELDS[-1])
        else:
            fields = tuple(metrics[0])
    lines = [",".join(fields)]
    for m in metrics:
        lines.append(",".join(f"{m[k]:.6f}" if isinstance(m[k], float) else str(m[k]) for k in fields))
    return "\n".join(lines) + "\n"
