"""Mine hard negatives: the boxes a detector finds in the training frames where no sign is.

    python -m training.hard_negatives --checkpoint models/checkpoints/detector.pt \
        --data-root ../shared/data --output models/checkpoints/hard_negatives.json

A blue window, a shirt, a red tail light: whatever the detector proposes on GTSDB's training frames
(00000-00499) at `--min-score` or above that overlaps no boxed sign (IoU < `--max-iou`). They are
exactly the regions the service's classifiers are shown and must reject, and the regions the next
detector should learn to leave dark, so they feed both:
- the detector's trainer centres a share of its windows on them (`--hard-negative-probability`);
- calibration fits the recognition gate with their crops among the background (training.calibrate).

The file is a JSON list of {"frame", "box", "score", "group"}, boxes in the frame's pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from models.atomic import atomic_write_text
from models.checkpoint import load_checkpoint
from models.detector import box_iou, detect
from models.gtsdb import read_ground_truth, split_frames
from models.paths import PROJECT_ROOT, default_data_root
from models.preprocessing import image_to_uint8

DEFAULT_FILE = PROJECT_ROOT / "models" / "checkpoints" / "hard_negatives.json"


def read_hard_negatives(path: str | Path) -> list[dict]:
    """The mined boxes of `path`, or a clear error naming the command that writes them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hard negatives at {path}; write them with python -m training.hard_negatives")
    return json.loads(path.read_text())


def to_json(negatives: list[dict]) -> str:
    """A JSON array with one box per line: a diff of a re-mined file reads box by box."""
    return "[\n" + ",\n".join(json.dumps(n) for n in negatives) + "\n]\n"


def mine(detector, frames, folder: Path, min_score: float, max_iou: float) -> list[dict]:
    pre = detector.preprocessing
    detector.model.to(memory_format=torch.channels_last)
    negatives = []
    for frame in frames:
        with Image.open(folder / frame.name) as image:
            pixels = image_to_uint8(image, pre).unsqueeze(0)
        (found,) = detect(detector.model, pixels, pre, min_score=min_score)
        for d in found:
            if all(box_iou(d.box, s.box) < max_iou for s in frame.signs):
                negatives.append({"frame": frame.name, "box": [round(v, 1) for v in d.box],
                                  "score": round(d.score, 4), "group": d.group})
    return negatives


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(PROJECT_ROOT / "models" / "checkpoints" / "detector.pt"))
    p.add_argument("--data-root", default=default_data_root(), help="folder holding gtsdb/ (env GTSRB_ROOT)")
    p.add_argument("--output", default=str(DEFAULT_FILE))
    p.add_argument("--min-score", type=float, default=0.2, help="detector score from which a box counts")
    p.add_argument("--max-iou", type=float, default=0.3, help="a box overlapping a sign this much is not a negative")
    p.add_argument("--max-frames", type=int, default=None, help="the first N training frames, for smoke runs")
    args = p.parse_args(argv)
    detector = load_checkpoint(args.checkpoint)
    frames = split_frames(read_ground_truth(args.data_root), "train")[:args.max_frames]
    negatives = mine(detector, frames, Path(args.data_root) / "gtsdb" / "images", args.min_score, args.max_iou)
    atomic_write_text(to_json(negatives), args.output)
    print(f"{len(negatives)} hard negatives in {len(frames)} training frames "
          f"(score >= {args.min_score}, IoU < {args.max_iou} with every sign) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
