"""The model kinds the service serves, registered once each (app.kinds.base says what a kind is).

Adding a kind is a module with a ModelKind subclass and one `register` line below (docs/model-kinds.md).
"""

from __future__ import annotations

from app.kinds.base import ModelKind, ServedModel
from app.kinds.classifier import ClassifierKind
from app.kinds.detector import DetectorKind
from app.kinds.ensemble import EnsembleKind
from models.checkpoint import LoadedModel

KINDS: dict[str, ModelKind] = {}


def register(name: str, kind: ModelKind) -> ModelKind:
    """Serve checkpoints whose `kind` is `name` with `kind` (a later registration replaces an earlier one)."""
    kind.name = name
    KINDS[name] = kind
    return kind


def kind_of(loaded: LoadedModel) -> ModelKind:
    try:
        return KINDS[loaded.kind]
    except KeyError:
        raise ValueError(f"{loaded.name}: no model kind {loaded.kind!r} is registered "
                         f"(registered: {', '.join(KINDS)})") from None


register("classifier", ClassifierKind())
register("detector", DetectorKind())
register("ensemble", EnsembleKind())

__all__ = ["KINDS", "ModelKind", "ServedModel", "kind_of", "register"]
