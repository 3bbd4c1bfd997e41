"""Honest answers: calibrated probabilities, and whether an image is one of the 43 signs at all.

Pure functions and one small record, shared by `training.calibrate` (which fits them), serving
(`/v1/predict`) and the street-scene detector (which drops boxes that are not signs):

- temperature scaling (Guo et al. 2017): softmax(logits / T) with one T fitted by minimising the
  negative log-likelihood on held-out data; it changes no prediction, only how sure each one is;
- the sign gate: a logistic regression on the network's penultimate features that gives
  P(the image shows one of the 43 signs), fitted on sign crops against background patches;
- `is_recognized`: the one rule that turns both into a yes/no.

A checkpoint stores its `Calibration` as plain data (`to_dict`) under the key "calibration".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import classifier_head, penultimate_features

ECE_BINS = 15
# Without a fitted rule (an uncalibrated checkpoint) an answer counts as recognised when its
# top-1 probability is at least this.
DEFAULT_MIN_CONFIDENCE = 0.5

Number = TypeVar("Number", float, torch.Tensor)


@dataclass(frozen=True)
class RecognitionRule:
    """Thresholds chosen on validation data: recognised = confident enough AND sign-like enough."""

    min_confidence: float = DEFAULT_MIN_CONFIDENCE  # on the calibrated top-1 probability
    min_sign_probability: float = 0.0  # on the gate's P(one of the 43 signs); 0: no gate

    def check(self) -> None:
        for name in ("min_confidence", "min_sign_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} is not a probability")


def is_recognized(top_probability: Number, sign_probability: Number, rule: RecognitionRule) -> Number:
    """True when the image most likely shows the sign it was classified as: its calibrated top-1
    probability and its sign probability both reach the rule's thresholds. Works on floats (-> bool)
    and elementwise on tensors (-> bool tensor)."""
    return (top_probability >= rule.min_confidence) & (sign_probability >= rule.min_sign_probability)


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    gate_weight: torch.Tensor | None = None  # [D] over the penultimate features; None: no gate
    gate_bias: float = 0.0
    rule: RecognitionRule = field(default_factory=RecognitionRule)
    report: dict = field(default_factory=dict)  # how it was fitted and what it measured (plain data)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return calibrated_probabilities(logits, self.temperature)

    def sign_probability(self, features: torch.Tensor) -> torch.Tensor:
        """P(sign) per row of features [N, D]; all ones without a gate."""
        if self.gate_weight is None:
            return torch.ones(features.shape[0], dtype=features.dtype, device=features.device)
        return torch.sigmoid(features @ self.gate_weight.to(features) + self.gate_bias)

    def check(self) -> None:
        """ValueError when the numbers cannot be served (what a checkpoint's loader refuses)."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature {self.temperature} is not a positive number")
        if self.gate_weight is not None and (self.gate_weight.ndim != 1 or not torch.isfinite(self.gate_weight).all()):
            raise ValueError("gate_weight is not a finite vector")
        if not math.isfinite(self.gate_bias):
            raise ValueError(f"gate_bias {self.gate_bias} is not finite")
        self.rule.check()
        if not isinstance(self.report, dict):
            raise ValueError("report is not a dict")

    def to_dict(self) -> dict:
        return {"temperature": float(self.temperature),
                "gate_weight": None if self.gate_weight is None else self.gate_weight.detach().float().cpu(),
                "gate_bias": float(self.gate_bias),
                "min_confidence": float(self.rule.min_confidence),
                "min_sign_probability": float(self.rule.min_sign_probability),
                "report": dict(self.report)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        if not d:
            return cls()
        weight = d.get("gate_weight")
        return cls(temperature=float(d["temperature"]),
                   gate_weight=None if weight is None else weight.float(),
                   gate_bias=float(d.get("gate_bias", 0.0)),
                   rule=RecognitionRule(float(d.get("min_confidence", DEFAULT_MIN_CONFIDENCE)),
                                        float(d.get("min_sign_probability", 0.0))),
                   report=dict(d.get("report", {})))


class CalibratedClassifier(nn.Module):
    """A classifier with its calibration as one module: normalised batch -> (calibrated probabilities
    [N, C], sign probabilities [N]). Plain tensor ops, so the serving backends (ONNX Runtime,
    OpenVINO) export and run the calibration along with the network."""

    def __init__(self, model: nn.Module, calibration: Calibration) -> None:
        super().__init__()
        self.model = model
        self.temperature = calibration.temperature
        self.has_gate = calibration.gate_weight is not None
        dim = classifier_head(model).in_features
        self.register_buffer("gate_weight", calibration.gate_weight.float().view(dim, 1) if self.has_gate
                             else torch.zeros(dim, 1))
        self.gate_bias = calibration.gate_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = penultimate_features(self.model, x)
        probabilities = (classifier_head(self.model)(features).float() / self.temperature).softmax(dim=1)
        if self.has_gate:
            signs = torch.sigmoid(features.float() @ self.gate_weight.float() + self.gate_bias).flatten()
        else:
            signs = torch.ones_like(probabilities[:, 0])
        return probabilities, signs


def calibrated_outputs(model: nn.Module, calibration: Calibration, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier on a normalised batch -> (calibrated probabilities [N, C], sign probabilities [N]),
    float32 on x's device. Serving (through CalibratedClassifier) and the detector's naming of boxes
    both compute this; feed the top-1 probability and the sign probability to `is_recognized` with
    `calibration.rule`."""
    return CalibratedClassifier(model, calibration)(x)


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits.float() / temperature).softmax(dim=-1)


def negative_log_likelihood(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    picked = probabilities.gather(1, labels.view(-1, 1)).clamp_min(1e-12)
    return float(-picked.log().mean())


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Top-1 ECE: sum over equal-width confidence bins of |accuracy - mean confidence| x bin share."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += float(mask.float().mean() * (correct[mask].mean() - confidence[mask].mean()).abs())
    return total


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) (convex in 1/T: LBFGS on log T)."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
