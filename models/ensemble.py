"""The ensemble: the mean of the calibrated probabilities of several classifiers (cnn and resnet18).

Each member classifies the image with its own preprocessing and calibration; the ensemble averages
their class probabilities and their sign probabilities, and decides with models.calibration's
`is_recognized` under its own minimum confidence. `training.calibrate` measures it and writes its
description (`EnsembleSpec.to_dict`) into every member's checkpoint under the key "ensemble".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models.calibration import RecognitionRule

ENSEMBLE_NAME = "ensemble"
ENSEMBLE_MEMBERS = ("cnn", "resnet18")


def ensemble_probabilities(member_probabilities: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(member_probabilities).mean(0)


def ensemble_sign_probability(member_sign_probabilities: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(member_sign_probabilities).mean(0)


# A classifier's answer for one image, as plain lists: every class id by falling probability, those
# probabilities, and P(one of the signs)
Ranked = tuple[list[int], list[float], float]


def ranked_answers(probabilities: torch.Tensor, signs: torch.Tensor) -> list[Ranked]:
    """Calibrated probabilities [N, C] and sign probabilities [N] -> one Ranked answer per image."""
    probabilities, class_ids = probabilities.float().cpu().sort(dim=1, descending=True)
    return list(zip(class_ids.tolist(), probabilities.tolist(), signs.float().cpu().tolist()))


def combine_ranked(member_answers: Sequence[Ranked]) -> Ranked:
    """The ensemble's answer for one image from its members' (the same means as above, on the
    plain lists the service passes around)."""
    n = len(member_answers)
    probabilities = [0.0] * len(member_answers[0][0])
    for class_ids, member_probabilities, _ in member_answers:
        for c, p in zip(class_ids, member_probabilities):
            probabilities[c] += p / n
    order = sorted(range(len(probabilities)), key=probabilities.__getitem__, reverse=True)
    return order, [probabilities[c] for c in order], sum(a[2] for a in member_answers) / n


@dataclass(frozen=True)
class EnsembleSpec:
    members: tuple[str, ...] = ENSEMBLE_MEMBERS
    rule: RecognitionRule = field(default_factory=lambda: RecognitionRule(0.5, 0.5))
    report: dict = field(default_factory=dict)  # measured figures (plain data), as in Calibration.report

    @property
    def test_accuracy(self) -> float | None:
        return self.report.get("after", {}).get("test", {}).get("accuracy")

    @property
    def validation_accuracy(self) -> float | None:
        return self.report.get("validation_accuracy")

    def check(self) -> None:
        if len(self.members) < 2 or not all(isinstance(m, str) for m in self.members):
            raise ValueError(f"members {self.members!r} are not two or more model names")
        self.rule.check()
        if not isinstance(self.report, dict):
            raise ValueError("report is not a dict")

    def to_dict(self) -> dict:
        return {"members": list(self.members), "min_confidence": self.rule.min_confidence,
                "min_sign_probability": self.rule.min_sign_probability, "report": dict(self.report)}

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleSpec":
        return cls(tuple(d["members"]), RecognitionRule(float(d["min_confidence"]), float(d["min_sign_probability"])),
                   dict(d.get("report", {})))
