"""The detector's parts: network shapes, target drawing, decoding, matching and AP, box mapping,
and a short training run with stop/resume and evaluation on real GTSDB frames."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint
from models.detector import (GROUPS, STRIDE, SignDetector, box_iou, classifier_crops, crop_box, decode,
                             group_of, pad_to_multiple)
from models.preprocessing import Preprocessing, image_to_uint8
from models.scene import Scene
from models.gtsrb import default_data_root
from training.detection_data import make_targets
from training.detection_metrics import average_precision, balanced_threshold, detection_summary, match
from models.gtsdb import VAL_FRAMES, frame_number, read_ground_truth, split_frames

ROOT = Path(__file__).resolve().parent.parent


def test_groups_follow_the_benchmark():
    assert [group_of(c) for c in (0, 5, 16)] == [0, 0, 0]  # prohibitory: speed limits, 3.5 t
    assert [group_of(c) for c in (11, 18, 31)] == [1, 1, 1]  # danger: triangles
    assert [group_of(c) for c in (33, 38, 40)] == [2, 2, 2]  # mandatory: blue rounds
    assert [group_of(c) for c in (6, 12, 13, 14, 17, 32, 41, 42)] == [3] * 8  # the rest
    assert len(GROUPS) == 4


def test_network_is_fully_convolutional_at_stride_4():
    model = SignDetector().eval()
    x = pad_to_multiple(torch.zeros(2, 3, 100, 170))
    assert x.shape[-2:] == (128, 192)
    heat, size, offset = model(x)
    assert heat.shape == (2, 4, 32, 48) and size.shape == offset.shape == (2, 2, 32, 48)
    # the heat map starts at the 1 % prior, so a fresh network finds nothing
    assert heat.sigmoid().max() < 0.05


def test_targets_put_one_peak_per_sign_with_its_size_and_offset():
    t = make_targets([(10.0, 20.0, 42.0, 44.0)], [1], 4, 64, 64)
    centre = (26 / STRIDE, 32 / STRIDE)  # (6.5, 8.0) in cells
    iy, ix = int(centre[1]), int(centre[0])
    assert t["heat"][1, iy, ix] == 1 and t["heat"][1].sum() > 1  # a Gaussian around the peak
    assert t["heat"][[0, 2, 3]].sum() == 0 and t["mask"].sum() == 1
    assert t["size"][:, iy, ix].exp().mul(STRIDE).tolist() == pytest.approx([32.0, 24.0])
    assert t["offset"][:, iy, ix].tolist() == pytest.approx([0.5, 0.0])


def test_decoding_targets_gives_back_the_boxes():
    boxes = [(10.0, 20.0, 42.0, 44.0), (80.0, 8.0, 120.0, 50.0)]
    t = make_targets(boxes, [1, 3], 4, 128, 128)
    logit = torch.logit(t["heat"].clamp(1e-6, 1 - 1e-6)).unsqueeze(0)
    [found] = decode(logit, t["size"].unsqueeze(0), t["offset"].unsqueeze(0), min_score=0.5)
    assert sorted((d.group, tuple(round(v, 3) for v in d.box)) for d in found) == [(1, boxes[0]), (3, boxes[1])]


def test_matching_takes_predictions_by_score_and_each_sign_once():
    truths = [(0, 0, 10, 10), (20, 0, 30, 10)]
    predictions = [((0, 0, 10, 10), 0.9), ((0, 0, 10, 11), 0.8), ((50, 50, 60, 60), 0.7), ((20, 0, 30, 10), 0.6)]
    assert match(predictions, truths) == [0, None, None, 1]
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_the_balanced_threshold_holds_up_the_weaker_of_precision_and_recall():
    # best F1 would take 0.50 (0.98/0.80: F1 0.884 against 0.871); the balanced rule keeps both above 0.85
    points = {0.35: (0.82, 0.86), 0.40: (0.88, 0.86), 0.45: (0.90, 0.85), 0.50: (0.98, 0.80)}
    assert balanced_threshold(points) == 0.40
    assert balanced_threshold({0.3: (0.9, 0.8), 0.4: (0.8, 0.9)}) == 0.4  # a tie: the higher threshold


def test_average_precision_and_summary():
    assert average_precision([(0.9, True), (0.8, True)], 2) == pytest.approx(1.0)
    # hit, miss, hit over 2 signs: recall 0.5 at precision 1, recall 1 at precision 2/3
    assert average_precision([(0.9, True), (0.8, False), (0.7, True)], 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    frames = [([((0, 0, 10, 10), 0.9), ((40, 40, 50, 50), 0.2)], [(0, 0, 10, 10), (20, 20, 30, 30)])]
    s = detection_summary(frames, 0.5)
    assert (s["precision"], s["recall"], s["signs"], s["frames"]) == (1.0, 0.5, 2, 1)


def test_boxes_map_back_to_the_uploaded_image_and_crops_keep_a_margin():
    pre = Preprocessing(input_size=1360, resize="fit")
    assert pre.target_size(4000, 3000) == (1360, 1020) and pre.target_size(1360, 800) == (1360, 800)
    assert pre.target_size(600, 400) == (600, 400)  # never enlarged
    box = Scene(Image.new("RGB", (1360, 1020)), (4000, 3000)).to_original((100, 50, 200, 150))
    assert box == pytest.approx((100 * 4000 / 1360, 50 * 3000 / 1020, 200 * 4000 / 1360, 150 * 3000 / 1020))
    assert crop_box((100, 100, 150, 150), 1000, 1000) == (95, 95, 155, 155)
    assert crop_box((0, 0, 20, 20), 15, 15) == (0, 0, 15, 15)  # clipped to the image
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    crops = classifier_crops(image, [(10, 10, 50, 50), (100, 20, 190, 90)], Preprocessing(input_size=32))
    assert crops.shape == (2, 3, 32, 32) and crops.dtype == torch.uint8


def test_fit_preprocessing_keeps_the_aspect_ratio():
    frame = image_to_uint8(Image.new("RGB", (2720, 1600)), Preprocessing(input_size=1360, resize="fit"))
    assert frame.shape == (3, 800, 1360)


def test_gtsdb_ground_truth_and_validation_block():
    frames = read_ground_truth(default_data_root())
    folder = Path(default_data_root()) / "gtsdb"
    images = {p.name for p in (folder / "images").glob("*.jpg")}
    lines = [line for line in (folder / "gt.txt").read_text().splitlines()
             if line.strip() and line.split(";")[0].replace(".ppm", ".jpg") in images]
    assert len(frames) == len(images) > 0 and sum(len(f.signs) for f in frames) == len(lines) > 0
    val = split_frames(frames, "val")
    assert [frame_number(f.name) for f in val] == list(VAL_FRAMES)
    assert not {f.name for f in val} & {f.name for f in split_frames(frames, "train")}
    first = next(f for f in frames if f.name == "00000.jpg")
    assert first.signs[0].box == (774.0, 411.0, 816.0, 447.0) and first.signs[0].class_id == 11


SMALL = ["--crops-per-epoch", "32", "--batch-size", "16", "--max-train-frames", "20", "--max-val-frames", "4",
         "--paste-signs", "100"]


def train_detector(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.train", "--model", "detector", "--data-root",
                           default_data_root(), *SMALL, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_detector_trains_logs_stops_resumes_and_evaluates(tmp_path, checkpoint_snapshot):
    out = tmp_path / "detector.pt"
    first = train_detector("--epochs", "2", "--output", str(out), "--stop-after-epochs", "1")
    assert first.returncode == 99, first.stderr  # stopped as if preempted, resumable
    resumed = train_detector("--epochs", "2", "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    rows = list(csv.DictReader(open(tmp_path / "detector.metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"train_loss", "val_precision", "val_recall", "val_map50"}
    log = (tmp_path / "detector.log").read_text()
    assert log.count("\nepoch ") + log.startswith("epoch ") == 2
    loaded = load_checkpoint(out)
    assert loaded.architecture == "detector" and loaded.class_names == list(GROUPS)
    assert loaded.preprocessing.resize == "fit" and len(loaded.metrics) == 2
    assert 0 < loaded.inference["score_threshold"] < 1

    report = subprocess.run([sys.executable, "-m", "training.evaluate_detection", "--checkpoint", str(out),
                             "--classifier", str(checkpoint_snapshot / "cnn.pt"),
                             "--data-root", default_data_root(), "--frames", "val", "--max-frames", "12",
                             "--choose-threshold"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    result = json.loads(report.stdout.strip().splitlines()[-1])
    first_val = split_frames(read_ground_truth(default_data_root()), "val")[:12]
    assert result["frames"] == 12 and result["signs"] == sum(len(f.signs) for f in first_val) > 0
    assert {"precision", "recall", "map50", "end_to_end"} <= set(result)
    assert "group danger" in report.stdout and "width 0-24 px" in report.stdout
    lines = report.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["min_score"])
    sweep = [line.split() for line in lines[start + 1:start + 12]]
    assert [float(row[0]) for row in sweep] == [t / 100 for t in range(20, 71, 5)]
    recalls = [float(row[2]) for row in sweep]
    assert recalls == sorted(recalls, reverse=True)  # a higher threshold never finds more
    chosen = next(row for row in sweep if float(row[0]) == result["min_score"])  # reported at the stored threshold
    assert load_checkpoint(out).inference["score_threshold"] == result["min_score"]
    assert float(chosen[2]) == pytest.approx(result["recall"], abs=1e-4)
    assert float(chosen[3]) == pytest.approx(result["end_to_end"], abs=1e-4)


def test_scene_decoding_keeps_a_photo_that_needs_no_change_usable():
    # an upright RGB JPEG already at the detector's size is returned as decoded; it must stay open
    import io

    from app.imaging import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (1360, 800), (120, 30, 30)).save(buffer, "JPEG")
    decoded = decode_image(buffer.getvalue(), max_side=1360)
    assert decoded.original_size == (1360, 800) and decoded.scale == (1.0, 1.0)
    assert image_to_uint8(decoded.image, Preprocessing(input_size=1360, resize="fit")).shape == (3, 800, 1360)


def test_flip_test_sees_a_mirrored_frame_as_the_mirror_of_the_frame(checkpoint_snapshot):
    """Averaging each frame with its mirror makes the heat maps mirror-symmetric: a real frame and its
    mirror image get the same scores, at mirrored places (offsets come from each frame's own look)."""
    shipped = load_checkpoint(checkpoint_snapshot / "detector.pt")
    frame = next(f for f in split_frames(read_ground_truth(default_data_root()), "val") if f.signs)
    with Image.open(Path(default_data_root()) / "gtsdb" / "images" / frame.name) as image:
        pixels = image_to_uint8(image.convert("RGB"), shipped.preprocessing)[:, :, :1344]  # no padding needed
    width = pixels.shape[2]
    from models.detector import detect

    # the full look (a reduced look pads its width at the right, where the mirror image has none)
    found, mirrored = (detect(shipped.model, p.unsqueeze(0), shipped.preprocessing, min_score=0.2, pyramid=(1.0,))[0]
                       for p in (pixels, pixels.flip(-1)))
    assert found, "the shipped detector finds the signs of a validation frame"
    assert [round(d.score, 5) for d in found] == [round(d.score, 5) for d in mirrored]
    for d, m in zip(found, mirrored):
        assert d.group == m.group
        assert (d.box[0] + d.box[2]) / 2 == pytest.approx(width - (m.box[0] + m.box[2]) / 2, abs=STRIDE)
        assert d.box[2] - d.box[0] == pytest.approx(m.box[2] - m.box[0], rel=1e-4)
    # one look only: the heat maps are the network's own, not symmetric
    plain, plain_mirrored = (detect(shipped.model, p.unsqueeze(0), shipped.preprocessing, min_score=0.2,
                                    flip_test=False, pyramid=(1.0,))[0] for p in (pixels, pixels.flip(-1)))
    assert [d.score for d in plain] != [d.score for d in plain_mirrored]


def test_boxes_are_named_by_the_classifier_the_operating_point_was_chosen_with():
    from types import SimpleNamespace

    from models.scene import default_namer

    tuned = SimpleNamespace(inference={"score_threshold": 0.3, "min_probability": 0.95, "classifier": "cnn"})
    assert default_namer(tuned, {"cnn": 0.9968, "resnet18": 0.9978}) == "cnn"
    # not served, or a detector whose operating point records none: the most accurate
    assert default_namer(tuned, {"resnet18": 0.9978, "other": 0.99}) == "resnet18"
    untuned = SimpleNamespace(inference={})
    assert default_namer(untuned, {"cnn": 0.9968, "resnet18": 0.9978}) == "resnet18"
    assert default_namer(untuned, {}) is None


def test_the_shipped_detector_records_the_classifier_of_its_operating_point():
    loaded = load_checkpoint(Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "detector.pt")
    assert loaded.inference["classifier"] == "cnn"
