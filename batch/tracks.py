"""One id per physical sign across a video's frames: a greedy IoU tracker.

Consecutive sampled frames of a moving camera see a sign at overlapping places; a box joins the
active track it overlaps most (IoU >= `min_iou`), else starts a new one, and a track not seen for
`max_gap` sampled frames ends. Per track: the class by vote, first and last time, the best frame
(highest probability) and its box.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@dataclass
class Track:
    id: int
    box: tuple[float, ...]  # where it was last seen
    last_seen: int  # sampled-frame counter
    votes: Counter = field(default_factory=Counter)
    labels: dict[int, str] = field(default_factory=dict)
    first_time_s: float = 0.0
    last_time_s: float = 0.0
    frames: int = 0
    best: dict = field(default_factory=dict)

    def summary(self, path: str) -> dict:
        class_id = self.votes.most_common(1)[0][0]
        return {"path": path, "track": self.id, "class_id": class_id, "label": self.labels[class_id],
                "votes": self.votes[class_id], "frames": self.frames, "first_time_s": self.first_time_s,
                "last_time_s": self.last_time_s, "best_frame": self.best["frame"],
                "best_time_s": self.best["time_s"], "best_box": self.best["box"],
                "best_probability": self.best["probability"]}


class IouTracker:
    def __init__(self, min_iou: float = 0.3, max_gap: int = 3) -> None:
        self.min_iou, self.max_gap = min_iou, max_gap
        self.active: list[Track] = []
        self.ended: list[Track] = []
        self.step = 0
        self.next_id = 1

    def update(self, signs: list[dict], frame: int, time_s: float) -> None:
        """Give each sign (a /v1/detect sign dict) its `track` id, in place."""
        self.step += 1
        free = list(self.active)
        for sign in sorted(signs, key=lambda s: -s["score"]):
            match = max(free, key=lambda t: iou(t.box, sign["box"]), default=None)
            if match is None or iou(match.box, sign["box"]) < self.min_iou:
                match = Track(self.next_id, tuple(sign["box"]), self.step, first_time_s=time_s)
                self.next_id += 1
                self.active.append(match)
            else:
                free.remove(match)
            match.box, match.last_seen, match.last_time_s = tuple(sign["box"]), self.step, time_s
            match.frames += 1
            match.votes[sign["class_id"]] += 1
            match.labels[sign["class_id"]] = sign["label"]
            if sign["probability"] > match.best.get("probability", -1):
                match.best = {"frame": frame, "time_s": time_s, "box": sign["box"],
                              "probability": sign["probability"]}
            sign["track"] = match.id
        gone = [t for t in self.active if self.step - t.last_seen > self.max_gap]
        self.active = [t for t in self.active if t not in gone]
        self.ended += gone

    def finish(self) -> list[Track]:
        tracks = sorted(self.ended + self.active, key=lambda t: t.id)
        self.active, self.ended = [], []
        return tracks
