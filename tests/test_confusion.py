"""training.confusion: the confusion arithmetic as pure functions, and the command on real test images."""

from __future__ import annotations

import math
import subprocess
import sys

import torch
from PIL import Image

from models.classes import CLASS_NAMES
from models.paths import PROJECT_ROOT as ROOT, default_data_root
from training.confusion import confusion_matrix, per_class_accuracy, top_confusions


def test_matrix_counts_true_against_predicted():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 2, 2, 2])
    m = confusion_matrix(predicted, labels, num_classes=4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert top_confusions(m, 5) == [(1, 2, 2), (0, 1, 1)]
    accuracy = per_class_accuracy(m)
    assert accuracy[:3].tolist() == [0.5, 1 / 3, 1.0] and math.isnan(accuracy[3])


def test_the_command_writes_tables_and_a_picture(tmp_path, checkpoint_snapshot):
    md, png = tmp_path / "confusion.md", tmp_path / "confusion.png"
    run = subprocess.run([sys.executable, "-m", "training.confusion", "--checkpoint", str(checkpoint_snapshot / "cnn.pt"),
                          "--checkpoint", str(checkpoint_snapshot / "resnet18.pt"), "--data-root", default_data_root(),
                          "--max-images", "600", "--markdown", str(md), "--figure", str(png)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    text = md.read_text()
    assert text.startswith("# Confusions") and "first 600 test images" in text and "](confusion.png)" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {"cnn", "resnet18", "ensemble"} <= set(rows)
    wrong = int(rows["ensemble"].split(" | ")[2])
    assert f"({min(wrong, 24)} images)" in run.stdout  # the picture shows the ensemble's mistakes
    with Image.open(png) as image:
        assert image.width > 400 and image.height > 100
    names_in_tables = [name for name in CLASS_NAMES if name in text]
    assert wrong == 0 or names_in_tables
