"""Results written one whole line at a time, and read back to resume: JSON lines or CSV.

A line is flushed and fsynced as soon as its frame is done, so a run killed at any moment leaves
whole lines only (a torn last line from a crash mid-write is cut off when the run resumes), and
the next run on the same file skips every frame already in it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

CSV_FIELDS = ("path", "frame", "time_s", "width", "height", "error", "sign", "x1", "y1", "x2", "y2", "score",
              "group", "class_id", "label", "probability", "track")

Key = tuple[str, "int | None"]


def is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def line_key(record: dict) -> Key:
    return record["path"], record.get("frame")


def cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short by a crash)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def done_keys(path: Path) -> set[Key]:
    """The frames already answered in `path` (JSON lines or CSV)."""
    if not path.is_file():
        return set()
    cut_torn_tail(path)
    with open(path, newline="") as f:
        if is_csv(path):
            return {(row["path"], int(row["frame"]) if row["frame"] else None) for row in csv.DictReader(f)}
        return {line_key(json.loads(line)) for line in f if line.strip()}


def csv_rows(record: dict) -> list[dict]:
    """One row per sign; a frame without signs (or with an error) still gets one row."""
    base = {k: record.get(k) for k in ("path", "frame", "time_s", "width", "height", "error")}
    signs = record.get("signs") or [None]
    rows = []
    for i, sign in enumerate(signs):
        row = dict(base)
        if sign is not None:
            x1, y1, x2, y2 = sign["box"]
            row.update(sign=i, x1=x1, y1=y1, x2=x2, y2=y2, score=sign["score"], group=sign["group"],
                       class_id=sign["class_id"], label=sign["label"], probability=sign["probability"],
                       track=sign.get("track"))
        rows.append(row)
    return rows


class ResultWriter:
    """Appends records to a JSON-lines or CSV file, each frame's line(s) written in one go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(path)
        new = not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        if is_csv(path) and new:
            self._write(",".join(CSV_FIELDS) + "\r\n")

    def _write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, record: dict) -> None:
        if is_csv(self.path):
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, CSV_FIELDS)
            writer.writerows(csv_rows(record))
            self._write(buffer.getvalue())
        else:
            self._write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
