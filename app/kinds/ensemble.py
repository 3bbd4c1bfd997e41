"""The ensemble: served classifiers averaged (models.ensemble), composed from their served models.

It has no checkpoint and no forward of its own: each image goes through every member's batcher (with
the member's own preprocessing) and `combine` averages their answers. `training.calibrate` writes the
ensemble's description (EnsembleSpec) into every member's checkpoint; it is served when every member
is, with the same description.
"""

from __future__ import annotations

import hashlib
import logging

from torch import nn

from app.kinds.base import ModelKind, ServedModel
from app.schemas.models import CalibrationInfo
from models.calibration import RecognitionRule
from models.ensemble import EnsembleSpec, Ranked, combine_ranked

log = logging.getLogger("signserve")


def spec_of(served: ServedModel) -> EnsembleSpec:
    return served.members[0].loaded.ensemble


class EnsembleKind(ModelKind):
    classifies = True
    trainer = "python -m training.calibrate (after training its members)"

    def compose(self, served: dict[str, ServedModel]) -> list[ServedModel]:
        specs = [m.loaded.ensemble for m in served.values() if m.loaded is not None and m.loaded.ensemble]
        if not specs:
            return []
        spec = specs[0]
        members = [served.get(name) for name in spec.members]
        if any(m is None or m.loaded is None or m.loaded.ensemble != spec for m in members):
            log.warning("not serving the ensemble: its members %s are not all served with the same calibration "
                        "run", ", ".join(spec.members))
            return []
        log.info("serving %s: the mean of the calibrated probabilities of %s (test accuracy %s)", self.name,
                 ", ".join(spec.members), spec.test_accuracy)
        return [ServedModel(self.name, self, None, None, 0.0, members=members)]

    def combine(self, per_runner: list[list[Ranked]]) -> list[Ranked]:
        return [combine_ranked(answers) for answers in zip(*per_runner)]

    def rule(self, served: ServedModel) -> RecognitionRule:
        return spec_of(served).rule

    def test_accuracy(self, served: ServedModel) -> float | None:
        return spec_of(served).test_accuracy

    def default_rank(self, served: ServedModel) -> float | None:
        # training.calibrate marks it the default when it beat each member on validation data
        return 2.0 if spec_of(served).report.get("default") else None

    def describe(self, served: ServedModel) -> dict:
        members, spec = [m.loaded for m in served.members], spec_of(served)
        return {"architecture": self.name, "parameters": sum(m.parameters for m in members),
                "input_size": max(m.preprocessing.input_size for m in members), "epochs": 0,
                "start_weights": " + ".join(spec.members), "members": list(spec.members),
                "checkpoint_sha256": hashlib.sha256("".join(m.sha256 for m in members).encode()).hexdigest(),
                "device": str(members[0].device),
                "calibration": CalibrationInfo.from_report(spec.report, spec.rule, temperature=None)}

    def layers(self, served: ServedModel) -> nn.Module:
        raise ValueError(f"{served.name} averages {' and '.join(m.name for m in served.members)}, which have "
                         "receptive fields of their own: ask for one of them")
