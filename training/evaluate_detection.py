"""Evaluate the detector and a naming classifier on GTSDB frames.

    python -m training.evaluate_detection --checkpoint models/checkpoints/detector.pt \
        --data-root ../shared/data --frames val

`--data-root` is a folder holding gtsdb/ (gt.txt and images/). On the training frames shipped with
the project use `--frames val` (00500-00599, never trained on); on a folder of other frames (e.g.
the benchmark's test frames) the default `all` takes every frame. A prediction is right when it
overlaps an unmatched true sign with IoU >= 0.5 (predictions by falling score, each sign matched at
most once); `end_to_end` counts signs both found and named with the right one of 43 classes.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from models.checkpoint import LoadedModel, atomic_save, load_checkpoint, safe_load, served_checkpoints
from models.detector import GROUPS, group_of
from models.scene import default_namer, find_signs
from models.gtsrb import PROJECT_ROOT, default_data_root
from training.detection_metrics import detection_summary, match, operating_point
from models.gtsdb import read_ground_truth, split_frames
from training.scale_views import close_up, gtsrb_test_crops, zoom_views

SIZE_BUCKETS = ((0, 24), (24, 48), (48, 10_000))  # sign width in pixels
VIEW_SIZE_BUCKETS = ((0, 24), (24, 48), (48, 96), (96, 192), (192, 384), (384, 10_000))
SWEEP = tuple(t / 100 for t in range(20, 71, 5))  # the score thresholds --sweep reports
# classifier probabilities --choose-threshold tries as the scene rule's floor (models.scene.scene_rule)
PROBABILITY_FLOORS = (0.0, 0.9, 0.95, 0.98)
MIN_PRECISION = 0.95  # --choose-threshold: the most recall among the points this precise (detection_metrics)


def store_threshold(path: Path, score_threshold: float, min_probability: float, classifier: str) -> None:
    """Write the service's default min_score, the probability floor of its scene rule
    (models.scene.scene_rule) and the classifier they were chosen with (models.scene.default_namer)
    into a detector checkpoint (atomically, nothing else changes)."""
    checkpoint = safe_load(path)
    checkpoint["inference"] = {**checkpoint.get("inference", {}), "score_threshold": score_threshold,
                               "min_probability": min_probability, "classifier": classifier}
    atomic_save(checkpoint, path)


def sweep_points(evaluated: list) -> dict[float, tuple[float, float]]:
    """(precision, recall) at each SWEEP score threshold."""
    low = [([(f.box, f.score) for f in found], [s.box for s in truths]) for found, truths in evaluated]
    return {t: (lambda at: (at["precision"], at["recall"]))(detection_summary(low, t)) for t in SWEEP}


def naming_classifier(detector: LoadedModel, directory: Path) -> LoadedModel:
    """The classifier checkpoint in `directory` that the service names the detector's boxes with by
    default (models.scene.default_namer)."""
    classifiers = {p.stem: load_checkpoint(p, name=p.stem) for p in served_checkpoints(directory)}
    classifiers = {name: m for name, m in classifiers.items() if m.kind == "classifier"}
    if not classifiers:
        raise SystemExit(f"no classifier checkpoint in {directory} to name the boxes; pass --classifier")
    return classifiers[default_namer(detector, {name: m.test_accuracy for name, m in classifiers.items()})]


def scored_at(evaluated: list, min_score: float) -> tuple[int, list[tuple[int, float, bool]]]:
    """Signs found at or above `min_score` and named right, and per true sign (group, width, found)."""
    named, per_sign = 0, []
    for found, truths in evaluated:
        kept = [f for f in found if f.score >= min_score]
        hits = match([(f.box, f.score) for f in kept], [s.box for s in truths])
        matched = {j: f for f, j in zip(kept, hits) if j is not None}
        named += sum(1 for j, f in matched.items() if f.class_id == truths[j].class_id)
        per_sign += [(group_of(s.class_id), s.box[2] - s.box[0], j in matched) for j, s in enumerate(truths)]
    return named, per_sign


def score_views(views, detector: LoadedModel, classifier: LoadedModel, min_score: float,
                flip_test: bool, min_probability: float) -> dict:
    """Run the scene pipeline on each view: how many target signs were found and named right, how
    many boxes were answered and how many of them match none of the view's signs, and per target
    width (VIEW_SIZE_BUCKETS) the named-right share."""
    count = named = boxes = false_positives = one_box = 0
    by_width: dict[tuple[int, int], list[int]] = {}
    for view in views:
        found = find_signs(view.image, detector, classifier, min_score=min_score, flip_test=flip_test,
                           min_probability=min_probability)
        hits = match([(f.box, f.score) for f in found], [s.box for s in view.signs])
        target = view.signs.index(view.target)
        right = any(j == target and f.class_id == view.target.class_id for f, j in zip(found, hits))
        count, named = count + 1, named + right
        boxes += len(found)
        false_positives += sum(j is None for j in hits)
        one_box += len(found) == 1
        width = view.target.box[2] - view.target.box[0]
        bucket = next(b for b in VIEW_SIZE_BUCKETS if b[0] <= width < b[1])
        by_width.setdefault(bucket, [0, 0])
        by_width[bucket][0] += 1
        by_width[bucket][1] += right
    return {"views": count, "named_right": named / max(1, count), "boxes": boxes,
            "precision": (boxes - false_positives) / boxes if boxes else 1.0, "one_box": one_box / max(1, count),
            "by_width": {f"{lo}-{hi if hi < 10_000 else 'max'}": {"views": n, "named_right": r / n}
                         for (lo, hi), (n, r) in sorted(by_width.items())}}


def print_views(label: str, scored: dict) -> None:
    widths = ", ".join(f"{k} px {v['named_right']:.2f} ({v['views']})" for k, v in scored["by_width"].items())
    print(f"{label:<14}{scored['views']:>6}{scored['named_right']:>13.3f}{scored['precision']:>11.3f}"
          f"{scored['one_box']:>9.3f}   {widths}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(PROJECT_ROOT / "models" / "checkpoints" / "detector.pt"))
    p.add_argument("--classifier", default=None,
                   help="the checkpoint that names each box (default: as /v1/detect, the classifier beside "
                        "--checkpoint that its operating point was chosen with, else the most accurate)")
    p.add_argument("--data-root", default=default_data_root(), help="folder holding gtsdb/ (env GTSRB_ROOT)")
    p.add_argument("--frames", default="all", choices=["all", "val", "train"])
    p.add_argument("--max-frames", type=int, default=None, help="the first N of those frames, for smoke runs")
    p.add_argument("--min-score", type=float, default=None, help="default: the checkpoint's score_threshold")
    p.add_argument("--min-probability", type=float, default=None,
                   help="the classifier probability a box must reach (default: the checkpoint's min_probability)")
    p.add_argument("--no-flip-test", dest="flip_test", action="store_false",
                   help="one look at each frame, without averaging it with its mirror image (as served)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--sweep", action="store_true",
                   help="also print precision, recall and end-to-end at score thresholds 0.20-0.70 (one pass)")
    p.add_argument("--choose-threshold", action="store_true",
                   help="take the score threshold and probability floor (PROBABILITY_FLOORS) with the most "
                        "recall at precision >= MIN_PRECISION (else the balanced pair), report at them, and store "
                        "both in the checkpoint as the service's defaults (inference.score_threshold, "
                        "inference.min_probability); implies --sweep")
    p.add_argument("--zooms", default="", help="also score zoom views at these factors, e.g. 1,2,3,4: windows of "
                   "the frames around each sign scaled back to the frame's size (training/scale_views.py)")
    p.add_argument("--close-ups", type=int, default=0, metavar="N",
                   help="also score N GTSRB test images (seeded draw), each enlarged to a 600x600 photo of one sign")
    p.add_argument("--crops", type=int, default=0, metavar="N",
                   help="also score N GTSRB test images (the same draw) as stored, 15-96 px crops of one sign")
    p.add_argument("--photo-scale", type=float, default=None, metavar="F",
                   help="show every frame resized by F (e.g. 0.5: a 680x400 photo), boxes scaled with it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    detector = load_checkpoint(args.checkpoint)
    classifier = (load_checkpoint(args.classifier) if args.classifier
                  else naming_classifier(detector, Path(args.checkpoint).parent))
    for loaded in (detector, classifier):
        loaded.model.to(memory_format=torch.channels_last)  # as served: faster convolutions on the CPU
    min_score = args.min_score if args.min_score is not None else detector.inference.get("score_threshold", 0.3)
    if args.choose_threshold:
        min_score = min(SWEEP)  # find everything the sweep needs
    frames = split_frames(read_ground_truth(args.data_root), args.frames)[:args.max_frames]
    folder = Path(args.data_root) / "gtsdb" / "images"

    def run_frames(min_probability: float) -> tuple[list, list[float]]:
        """(signs found down to 0.05 under scene_rule at `min_probability`, the frame's true signs) per
        frame, and the seconds each took."""
        seconds, evaluated = [], []
        for frame in frames:
            with Image.open(folder / frame.name) as image:
                truths = frame.signs
                if args.photo_scale:
                    k = args.photo_scale
                    image = image.resize((round(image.width * k), round(image.height * k)), Image.Resampling.BILINEAR)
                    truths = [type(s)(tuple(v * k for v in s.box), s.class_id) for s in truths]
                started = time.perf_counter()
                evaluated.append((find_signs(image, detector, classifier, min_score=min(0.05, min_score),
                                             flip_test=args.flip_test, min_probability=min_probability), truths))
                seconds.append(time.perf_counter() - started)
        return evaluated, seconds

    min_probability = args.min_probability if args.min_probability is not None else \
        detector.inference.get("min_probability", 0.0)
    if args.choose_threshold:
        # one pass with every box the classifier's own rule names, then each floor as a filter on it
        evaluated, _ = run_frames(0.0)
        grid = {}
        for floor in PROBABILITY_FLOORS:
            kept = [([f for f in found if f.probability >= floor], truths) for found, truths in evaluated]
            grid.update({(floor, t): point for t, point in sweep_points(kept).items()})
        min_probability, _ = operating_point(grid, MIN_PRECISION)
        for floor in PROBABILITY_FLOORS:
            print(f"min_probability {floor:.2f}: " + ", ".join(f"{t:.2f} {grid[floor, t][0]:.3f}/{grid[floor, t][1]:.3f}"
                                                           for t in SWEEP[:5]) + " (min_score precision/recall)")
    evaluated, seconds = run_frames(min_probability)
    low_threshold = [([(f.box, f.score) for f in found], [s.box for s in truths]) for found, truths in evaluated]
    if args.sweep or args.choose_threshold:
        print(f"at min_probability {min_probability:.2f}:")
        print(f"{'min_score':>9}{'precision':>11}{'recall':>8}{'end-to-end':>12}")
        points = sweep_points(evaluated)
        for threshold, (precision, recall) in points.items():
            right = scored_at(evaluated, threshold)[0]
            print(f"{threshold:>9.2f}{precision:>11.4f}{recall:>8.4f}{right / max(1, sum(len(t) for _, t in evaluated)):>12.4f}")
        if args.choose_threshold:
            _, min_score = operating_point({(min_probability, t): v for t, v in points.items()}, MIN_PRECISION)
            store_threshold(Path(args.checkpoint), min_score, min_probability, classifier.name)
            print(f"stored score_threshold {min_score:.2f} and min_probability {min_probability:.2f} (precision and "
                  f"recall at least {min(points[min_score]):.4f}) in {args.checkpoint}")
    named, per_sign = scored_at(evaluated, min_score)
    summary = detection_summary(low_threshold, min_score)
    signs = summary["signs"]
    print(f"detector {args.checkpoint} (score >= {min_score:.2f}), named by {classifier.name} (probability >= "
          f"{min_probability:.2f}); "
          f"{len(frames)} frames, {signs} signs")
    print(f"{'signs':<24}{'count':>7}{'found':>7}{'recall':>9}")
    rows = [(f"group {name}", [s for s in per_sign if s[0] == g]) for g, name in enumerate(GROUPS)]
    rows += [(f"width {lo}-{hi if hi < 10_000 else 'max'} px", [s for s in per_sign if lo <= s[1] < hi])
             for lo, hi in SIZE_BUCKETS]
    for label, subset in rows:
        found = sum(s[2] for s in subset)
        print(f"{label:<24}{len(subset):>7}{found:>7}{found / max(1, len(subset)):>9.3f}")
    result = {"precision": summary["precision"], "recall": summary["recall"], "map50": summary["map50"],
              "end_to_end": named / signs if signs else 0.0, "frames": len(frames), "signs": signs,
              "min_score": min_score, "min_probability": min_probability, "classifier": classifier.name,
              "flip_test": args.flip_test,
              "seconds_per_frame_median": sorted(seconds)[len(seconds) // 2] if seconds else 0.0}
    print(f"precision {result['precision']:.4f} recall {result['recall']:.4f} AP@0.5 {result['map50']:.4f} "
          f"end-to-end {result['end_to_end']:.4f} ({named}/{signs} found and named right); "
          f"median {1000 * result['seconds_per_frame_median']:.0f} ms per frame in-process")
    views: dict[str, dict] = {}
    for zoom in [float(z) for z in args.zooms.split(",") if z.strip()]:
        views[f"zoom {zoom:g}x"] = score_views(zoom_views(frames, folder, zoom), detector, classifier, min_score,
                                              args.flip_test, min_probability)
    if args.close_ups:
        crops = gtsrb_test_crops(args.data_root, args.close_ups)
        views["close-ups"] = score_views(map(close_up, crops), detector, classifier, min_score, args.flip_test,
                                         min_probability)
    if args.crops:
        crops = gtsrb_test_crops(args.data_root, args.crops)
        views["crops"] = score_views((close_up(c, None) for c in crops), detector, classifier, min_score,
                                     args.flip_test, min_probability)
    if views:
        print(f"{'views':<14}{'count':>6}{'named right':>13}{'precision':>11}{'one box':>9}   named right by sign width")
        for label, scored in views.items():
            print_views(label, scored)
        result["views"] = views
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
