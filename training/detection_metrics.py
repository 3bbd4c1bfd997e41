"""Detection figures: matching at IoU >= 0.5, precision, recall, average precision (all pure).

Matching follows the benchmark's rule: predictions taken by descending score, each true sign
matched at most once, a prediction is right when its best still-unmatched sign overlaps it with
IoU >= 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.detector import box_iou

Box = tuple[float, float, float, float]


def match(predictions: Sequence[tuple[Box, float]], truths: Sequence[Box],
          iou_threshold: float = 0.5) -> list[int | None]:
    """For each prediction (in the given order, which must be by falling score), the index of the
    true box it matched, or None for a false positive."""
    taken = [False] * len(truths)
    result: list[int | None] = []
    for box, _ in predictions:
        best, best_iou = None, iou_threshold
        for j, truth in enumerate(truths):
            if not taken[j]:
                iou = box_iou(box, truth)
                if iou >= best_iou:
                    best, best_iou = j, iou
        if best is not None:
            taken[best] = True
        result.append(best)
    return result


def average_precision(scored: Sequence[tuple[float, bool]], num_truths: int) -> float:
    """Area under the precision-recall curve (all-point interpolation, as PASCAL VOC since 2010)
    of predictions (score, is_true_positive) pooled over frames."""
    if num_truths == 0:
        return 0.0
    ranked = sorted(scored, key=lambda s: -s[0])
    tp = fp = 0
    points = []  # (recall, precision) after each prediction
    for _, hit in ranked:
        tp, fp = tp + hit, fp + (not hit)
        points.append((tp / num_truths, tp / (tp + fp)))
    envelope, best = [], 0.0  # precision made monotone: the best at this recall or any higher
    for _, precision in reversed(points):
        best = max(best, precision)
        envelope.append(best)
    envelope.reverse()
    ap, previous_recall = 0.0, 0.0
    for (recall, _), best_precision in zip(points, envelope):
        ap += (recall - previous_recall) * best_precision
        previous_recall = recall
    return ap


def detection_summary(frames: Sequence[tuple[Sequence[tuple[Box, float]], Sequence[Box]]],
                      score_threshold: float) -> dict[str, float]:
    """Per frame (predictions by falling score, true boxes) -> precision and recall of the
    predictions at or above `score_threshold`, and AP@0.5 over all of them."""
    scored: list[tuple[float, bool]] = []
    kept_tp = kept = truths = 0
    for predictions, boxes in frames:
        truths += len(boxes)
        for (box, score), hit in zip(predictions, match(predictions, boxes)):
            scored.append((score, hit is not None))
        above = [p for p in predictions if p[1] >= score_threshold]
        hits = match(above, boxes)
        kept += len(above)
        kept_tp += sum(h is not None for h in hits)
    return {"precision": kept_tp / kept if kept else 0.0, "recall": kept_tp / truths if truths else 0.0,
            "map50": average_precision(scored, truths), "signs": truths, "frames": len(frames)}


def balanced_threshold(points: dict[float, tuple[float, float]]) -> float:
    """Score threshold -> (precision, recall): the threshold whose smaller figure is highest (ties: the
    higher threshold). Users need both: a missed sign and a made-up one cost alike."""
    return max(sorted(points, reverse=True), key=lambda t: min(points[t]))


def operating_point(points: dict[tuple[float, float], tuple[float, float]], min_precision: float) -> tuple[float, float]:
    """(probability floor, score threshold) -> (precision, recall): the point with the highest recall
    among those whose precision reaches `min_precision` (ties: the stricter point), so that a box the
    service answers is right that often; when no point reaches it, the balanced one (as above)."""
    strict = sorted(points, reverse=True)
    precise = [p for p in strict if points[p][0] >= min_precision]
    if precise:
        return max(precise, key=lambda p: points[p][1])
    return max(strict, key=lambda p: min(points[p]))
