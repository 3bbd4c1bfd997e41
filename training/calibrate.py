"""Calibrate trained classifiers without retraining them, and store the result in their checkpoints.

    python -m training.calibrate --checkpoint models/checkpoints/cnn.pt --checkpoint models/checkpoints/resnet18.pt

For each checkpoint (docs/calibration.md has the reasons and the measurements):
1. temperature: fitted (minimum NLL) on the GTSDB sign crops of frames 00000-00499, labelled signs
   the network never saw. Held-out GTSRB training tracks are no held-out data for a network that
   trained on every track: it is ~100 % right and sure on them, so a temperature fitted there makes
   it over-confident; they are still reported, as the split the textbook recipe would use;
2. sign gate: a logistic regression on the frozen penultimate features, GTSRB training crops and
   those GTSDB sign crops against background patches cut from the same frames away from every sign
   and the detector's hard negatives there (training.hard_negatives: what it proposes where no sign is);
   its threshold is the lowest that rejects VALIDATION_REJECTION of the background patches of the
   validation frames 00500-00599, folded into the gate's bias so that P(sign) >= 0.5 is the test;
3. minimum confidence: the lowest threshold on the calibrated top-1 probability at which the
   recognised GTSDB sign crops are, by their own calibrated probabilities, TARGET_PRECISION right.
The GTSRB test split is never fitted on; its figures are measured and stored for the record.

With the cnn and resnet18 checkpoints together, the ensemble (mean of both calibrated probability
vectors) is measured too and described in both checkpoints, so the service can offer it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from models.calibration import (Calibration, RecognitionRule, calibrated_probabilities, expected_calibration_error,
                                fit_temperature, is_recognized, negative_log_likelihood)
from models.checkpoint import LoadedModel, atomic_save, load_checkpoint, safe_load
from models.ensemble import ENSEMBLE_MEMBERS, EnsembleSpec, ensemble_probabilities, ensemble_sign_probability
from models.preprocessing import Preprocessing
from training.hard_negatives import DEFAULT_FILE as HARD_NEGATIVES_FILE, read_hard_negatives
from training.calibration_data import (FIT_FRAMES, VALIDATION_FRAMES, gtsdb_background_patches, gtsdb_sign_crops,
                                       hard_negative_crops, track_split)
from training.collect import logits_and_features
from models.gtsrb import default_data_root, list_samples, load_split

VALIDATION_REJECTION = 0.98  # share of validation background patches the gate must reject
TARGET_PRECISION = 0.995  # wanted share of right answers among the recognised ones
CONFIDENCE_GRID = tuple(round(0.05 * i, 2) for i in range(10, 20))  # 0.50, 0.55, ..., 0.95
GATE_L2 = 1e-3  # ridge on the standardised features; the gate is far from over-fitting either way
PATCHES_PER_FIT_FRAME = 6
PATCHES_PER_VALIDATION_FRAME = 6
# Every n-th image of a track is enough (the ~30 frames of a track are alike): gate positives from
# the fitting tracks, and the held-out tracks that are only measured.
TRAIN_FIT_EVERY = 6
TRAIN_HELD_OUT_EVERY = 4
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "calibration"


@dataclass
class Split:
    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor | None  # None: background, no sign


@dataclass
class Images:
    """Every image set of one preprocessing, uint8, with labels where there are signs."""

    train_fit: tuple[torch.Tensor, torch.Tensor]  # GTSRB training tracks outside the held-out ones
    train_held_out: tuple[torch.Tensor, torch.Tensor]  # GTSRB training tracks held out by track
    test: tuple[torch.Tensor, torch.Tensor]  # GTSRB test: measured, never fitted on
    signs_fit: tuple[torch.Tensor, torch.Tensor]  # GTSDB sign crops, frames 00000-00499
    signs_validation: tuple[torch.Tensor, torch.Tensor]  # GTSDB sign crops, frames 00500-00599
    background_fit: torch.Tensor  # random patches and the hard negatives, frames 00000-00499
    background_validation: torch.Tensor


def load_images(data_root: str, pre: Preprocessing, log: Callable[[str], None],
                hard_negatives: list[dict] = ()) -> Images:
    started = time.perf_counter()
    gtsdb = Path(data_root) / "gtsdb"
    train, test = load_split(data_root, "train", pre), load_split(data_root, "test", pre)
    held = track_split([p for p, _ in list_samples(data_root, "train")])
    fit_idx = torch.nonzero(~held).flatten()[::TRAIN_FIT_EVERY]
    held_idx = torch.nonzero(held).flatten()[::TRAIN_HELD_OUT_EVERY]
    images = Images(
        train_fit=(train.images[fit_idx], train.labels[fit_idx]),
        train_held_out=(train.images[held_idx], train.labels[held_idx]),
        test=(test.images, test.labels),
        signs_fit=gtsdb_sign_crops(gtsdb, FIT_FRAMES, pre),
        signs_validation=gtsdb_sign_crops(gtsdb, VALIDATION_FRAMES, pre),
        background_fit=torch.cat([gtsdb_background_patches(gtsdb, FIT_FRAMES, PATCHES_PER_FIT_FRAME, pre, seed=0),
                                  hard_negative_crops(gtsdb, list(hard_negatives), FIT_FRAMES, pre)]),
        background_validation=gtsdb_background_patches(gtsdb, VALIDATION_FRAMES, PATCHES_PER_VALIDATION_FRAME,
                                                       pre, seed=1),
    )
    log(f"images at {pre.input_size}x{pre.input_size} in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{name} {len(value[0] if isinstance(value, tuple) else value)}"
                    for name, value in vars(images).items()))
    return images


def run_model(loaded: LoadedModel, images: Images, cache_dir: Path | None = CACHE_DIR) -> dict[str, Split]:
    """Logits and features of every image set; cached on disk by weights and images (recalibrating
    the same weights, e.g. after changing a threshold, then costs no forward pass)."""
    digest = hashlib.sha256()
    for tensor in (*loaded.model.state_dict().values(), *(t for v in vars(images).values()
                                                           for t in (v if isinstance(v, tuple) else (v,)))):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    cache = Path(cache_dir) / f"{loaded.architecture}-{digest.hexdigest()[:16]}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        blob = safe_load(cache)
        return {name: Split(**value) for name, value in blob.items()}
    out = {}
    for name, value in vars(images).items():
        x, y = value if isinstance(value, tuple) else (value, None)
        logits, features = logits_and_features(loaded, x)
        out[name] = Split(logits, features, y)
    if cache is not None:
        atomic_save({name: vars(split) for name, split in out.items()}, cache)
    return out


def fit_gate(positives: torch.Tensor, negatives: torch.Tensor, l2: float = GATE_L2) -> tuple[torch.Tensor, float]:
    """Class-balanced, ridge-penalised logistic regression: (weight [D], bias) on the raw features
    (the standardisation it fits in is folded back into them)."""
    x = torch.cat([positives, negatives]).double()
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    sample_weight = torch.cat([torch.full((len(positives),), 0.5 / len(positives)),
                               torch.full((len(negatives),), 0.5 / len(negatives))]).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * sample_weight).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = w.detach(), b.detach()
    return (w / std).float(), float(b - (w * mean / std).sum())


def gate_threshold(validation_scores: torch.Tensor, rejection: float = VALIDATION_REJECTION) -> float:
    """The lowest P(sign) threshold that rejects `rejection` of the validation background patches."""
    ordered = validation_scores.double().sort().values
    k = min(len(ordered) - 1, math.ceil(rejection * len(ordered)) - 1)
    return float(ordered[k]) + 1e-9  # scores >= it pass: at most (1 - rejection) of the patches


def min_confidence(top_probabilities: torch.Tensor, target: float = TARGET_PRECISION) -> float:
    """The lowest grid threshold at which the accepted images' mean calibrated top-1 probability,
    the precision that calibration predicts, reaches `target` (the grid's last value otherwise)."""
    for t in CONFIDENCE_GRID:
        accepted = top_probabilities[top_probabilities >= t]
        if len(accepted) and float(accepted.mean()) >= target:
            return t
    return CONFIDENCE_GRID[-1]


def decide(probabilities: torch.Tensor, sign_probability: torch.Tensor, rule: RecognitionRule) -> torch.Tensor:
    return is_recognized(probabilities.max(1).values, sign_probability, rule)


def measure(probabilities: torch.Tensor, labels: torch.Tensor | None, recognized: torch.Tensor) -> dict:
    """Plain-number figures of one image set: accuracy, ECE, NLL and how many were recognised."""
    share = float(recognized.float().mean())
    if labels is None:
        return {"n": len(recognized), "rejected": 1 - share}
    right = probabilities.argmax(1) == labels
    return {"n": len(labels), "accuracy": float(right.float().mean()),
            "ece": expected_calibration_error(probabilities, labels),
            "nll": negative_log_likelihood(probabilities, labels),
            "recognized": share,
            "accuracy_recognized": float(right[recognized].float().mean()) if recognized.any() else 0.0}


def calibrate(loaded: LoadedModel, splits: dict[str, Split], log: Callable[[str], None]) -> Calibration:
    fit = splits["signs_fit"]
    temperature = fit_temperature(fit.logits, fit.labels)
    weight, bias = fit_gate(torch.cat([splits["train_fit"].features, fit.features]), splits["background_fit"].features)
    raw = Calibration(temperature, weight, bias)
    threshold = gate_threshold(raw.sign_probability(splits["background_validation"].features))
    # fold the threshold into the bias: P(sign) >= 0.5 now means "passes the gate"
    bias -= math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else 0.0
    gated = Calibration(temperature, weight, bias, RecognitionRule(0.0, 0.5))
    confidence = min_confidence(gated.probabilities(fit.logits).max(1).values)
    calibration = Calibration(temperature, weight, bias, RecognitionRule(confidence, 0.5))
    uncalibrated = Calibration()  # what was served before: plain softmax, no gate
    report: dict = {"fitted_on": {"temperature": "GTSDB sign crops, frames 00000-00499",
                                  "gate": "GTSRB training crops + GTSDB sign crops vs background patches, "
                                          "frames 00000-00499",
                                  "gate_threshold": "background patches, frames 00500-00599"},
                    "gate_threshold": threshold, "before": {}, "after": {}}
    for name, split in splits.items():
        for when, c in (("before", uncalibrated), ("after", calibration)):
            probabilities = c.probabilities(split.logits)
            recognized = decide(probabilities, c.sign_probability(split.features), c.rule)
            report[when][name] = measure(probabilities, split.labels, recognized)
    # the textbook split, for the record: the held-out training tracks (seen in training)
    held, test = splits["train_held_out"], splits["test"]
    alternative = fit_temperature(held.logits, held.labels)
    probabilities = calibrated_probabilities(test.logits, alternative)
    report["if_fitted_on_train_held_out"] = {
        "temperature": alternative, "test_ece": expected_calibration_error(probabilities, test.labels),
        "test_nll": negative_log_likelihood(probabilities, test.labels)}
    calibration = Calibration(temperature, weight, bias, calibration.rule, report)
    log(summary(loaded.name, calibration))
    return calibration


def summary(name: str, c: Calibration) -> str:
    r = c.report
    lines = [f"{name}: temperature {c.temperature:.3f}, gate threshold {r['gate_threshold']:.3f}, "
             f"min confidence {c.rule.min_confidence:.2f}"]
    for split in ("signs_fit", "train_held_out", "signs_validation", "test"):
        b, a = r["before"][split], r["after"][split]
        lines.append(f"  {split:17s} n {a['n']:5d} accuracy {a['accuracy']:.4f}  ECE {b['ece']:.4f} -> {a['ece']:.4f}"
                     f"  NLL {b['nll']:.4f} -> {a['nll']:.4f}  recognised {a['recognized']:.4f}, "
                     f"{a['accuracy_recognized']:.4f} of them right")
    for split in ("background_fit", "background_validation"):
        lines.append(f"  {split:17s} n {r['after'][split]['n']:5d} rejected {r['after'][split]['rejected']:.4f} "
                     f"(plain softmax at top-1 >= 0.5: {r['before'][split]['rejected']:.4f})")
    alt = r["if_fitted_on_train_held_out"]
    lines.append(f"  a temperature fitted on the held-out training tracks instead would be {alt['temperature']:.3f}: "
                 f"test ECE {alt['test_ece']:.4f}, NLL {alt['test_nll']:.4f}")
    return "\n".join(lines)


def measure_ensemble(members: dict[str, tuple[Calibration, dict[str, Split]]], log: Callable[[str], None]) -> dict:
    """The EnsembleSpec (as a dict) of the members, with its own minimum confidence and figures."""
    def combined(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = [c.probabilities(s[split].logits) for c, s in members.values()]
        signs = [c.sign_probability(s[split].features) for c, s in members.values()]
        return ensemble_probabilities(probabilities), ensemble_sign_probability(signs)

    probabilities, signs = combined("signs_fit")
    confidence = min_confidence(probabilities[signs >= 0.5].max(1).values)
    spec = EnsembleSpec(tuple(members), RecognitionRule(confidence, 0.5))
    report: dict = {"after": {}}
    any_member = next(iter(members.values()))[1]
    for name, split in any_member.items():
        probabilities, signs = combined(name)
        report["after"][name] = measure(probabilities, split.labels, decide(probabilities, signs, spec.rule))
    report["validation_accuracy"] = validation_accuracy(report)
    spec = EnsembleSpec(spec.members, spec.rule, report)
    log(f"ensemble of {', '.join(members)}: min confidence {confidence:.2f}")
    for name in ("signs_fit", "signs_validation", "test"):
        a = report["after"][name]
        log(f"  {name:17s} n {a['n']:5d} accuracy {a['accuracy']:.4f}  ECE {a['ece']:.4f}  NLL {a['nll']:.4f}  "
            f"recognised {a['recognized']:.4f}, {a['accuracy_recognized']:.4f} of them right")
    log(f"  background_validation rejected {report['after']['background_validation']['rejected']:.4f}")
    return spec.to_dict()


def validation_accuracy(report: dict) -> float:
    """Accuracy on every GTSDB sign crop (frames 00000-00599): labelled images no classifier trained
    on. The temperature was fitted on part of them, but a temperature changes no single model's answer."""
    fit, validation = report["after"]["signs_fit"], report["after"]["signs_validation"]
    return (fit["accuracy"] * fit["n"] + validation["accuracy"] * validation["n"]) / (fit["n"] + validation["n"])


def write_calibration(path: Path, calibration: Calibration, ensemble: dict | None) -> None:
    """Rewrite the checkpoint (atomically) with its calibration, weights and everything else as they were."""
    ckpt = safe_load(path)
    ckpt["calibration"] = calibration.to_dict()
    if ensemble is not None:
        ckpt["ensemble"] = ensemble
    else:
        ckpt.pop("ensemble", None)
    atomic_save(ckpt, path)


def calibrate_checkpoints(paths: list[Path], data_root: str, log: Callable[[str], None] = print,
                          write: bool = True, device: str = "cpu",
                          hard_negatives: list[dict] = ()) -> dict[str, Calibration]:
    images: dict[Preprocessing, Images] = {}
    fitted: dict[str, tuple[Calibration, dict[str, Split]]] = {}
    for path in paths:
        loaded = load_checkpoint(path, device=device)
        if loaded.preprocessing not in images:
            images[loaded.preprocessing] = load_images(data_root, loaded.preprocessing, log, hard_negatives)
        started = time.perf_counter()
        splits = run_model(loaded, images[loaded.preprocessing])
        log(f"{loaded.name}: forward over every set in {time.perf_counter() - started:.0f} s")
        calibration = calibrate(loaded, splits, log)
        calibration.report["validation_accuracy"] = validation_accuracy(calibration.report)
        fitted[loaded.architecture] = (calibration, splits)
    ensemble = None
    if all(name in fitted for name in ENSEMBLE_MEMBERS) and len(paths) == len(ENSEMBLE_MEMBERS):
        ensemble = measure_ensemble({name: fitted[name] for name in ENSEMBLE_MEMBERS}, log)
        best = max(c.report["validation_accuracy"] for c, _ in fitted.values())
        # At least as accurate as its best member: on a tie (one crop is 0.12 points) the mean of two
        # calibrated models is the safer bet; the tolerance absorbs float rounding of equal counts.
        ensemble["report"]["default"] = ensemble["report"]["validation_accuracy"] >= best - 1e-9
        log(f"validation accuracy (all GTSDB sign crops): ensemble {ensemble['report']['validation_accuracy']:.4f}, "
            + ", ".join(f"{n} {c.report['validation_accuracy']:.4f}" for n, (c, _) in fitted.items())
            + f"; the ensemble {'is' if ensemble['report']['default'] else 'is not'} the default")
    if write:
        for path in paths:
            architecture = load_checkpoint(path).architecture
            write_calibration(path, fitted[architecture][0], ensemble)
            log(f"wrote the calibration into {path}")
    return {name: c for name, (c, _) in fitted.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="a checkpoint to calibrate in place; give cnn and resnet18 together for the ensemble")
    parser.add_argument("--data-root", default=default_data_root(),
                        help="folder holding gtsrb/ and gtsdb/ (env GTSRB_ROOT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    parser.add_argument("--hard-negatives", default=str(HARD_NEGATIVES_FILE),
                        help="the detector's mined false positives, among the gate's background ('' for none)")
    args = parser.parse_args(argv)
    for path in args.checkpoint:
        if not path.is_file():
            parser.error(f"no checkpoint at {path}")
    if not (Path(args.data_root) / "gtsdb" / "gt.txt").is_file():
        parser.error(f"no GTSDB frames under {args.data_root}/gtsdb (calibration fits on its sign crops)")
    hard = read_hard_negatives(args.hard_negatives) if args.hard_negatives else []
    calibrate_checkpoints(args.checkpoint, args.data_root, write=not args.dry_run, device=args.device,
                          hard_negatives=hard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
