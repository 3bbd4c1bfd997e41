"""`signserve detect` on real GTSDB frames: the same answers as POST /v1/detect, error lines for bad
files, resume without a line twice, video frames with their times and tracks, CSV, shard merging, and
`make detect-cluster` on the real one-node Slurm.

No real video is in the data: the test makes an mp4 from GTSDB frames (each frame twice, so the same
physical sign is in consecutive video frames)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.output import cut_torn_tail, done_keys
from batch.sources import list_inputs, shard
from batch.tracks import IouTracker
from models.gtsrb import default_data_root

ROOT = Path(__file__).resolve().parent.parent
GTSDB = Path(default_data_root()) / "gtsdb" / "images"
FRAMES = ["00500.jpg", "00501.jpg", "00502.jpg", "00507.jpg"]


def signserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def make_video(path: Path, frames: list[Path], fps: int = 5) -> None:
    import av
    from PIL import Image

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1360, 800, "yuv420p"
        for frame in frames:
            with Image.open(frame) as image:
                picture = av.VideoFrame.from_image(image.convert("RGB"))
            for _ in range(2):
                out.mux(stream.encode(picture))
        out.mux(stream.encode())


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "photos" / "nested").mkdir(parents=True)
    for i, name in enumerate(FRAMES):
        shutil.copy(GTSDB / name, folder / "photos" / ("nested" if i % 2 else "") / name)
    (folder / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "photos" / "notes.txt").write_text("not an image, and not listed")
    make_video(folder / "drive.mp4", [GTSDB / name for name in FRAMES[:3]])
    return folder


@pytest.fixture(scope="module")
def first_run(inputs, checkpoint_snapshot, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = signserve("detect", str(inputs / "photos"), str(inputs / "drive.mp4"), str(inputs / "missing.jpg"),
                       "-o", str(out / "results.jsonl"), "--tracks", str(out / "tracks.jsonl"), "--fps", "5",
                       "--draw", str(out / "boxed"), "--checkpoint-dir", str(checkpoint_snapshot),
                       "--backend", "torch", "--no-progress")
    assert result.returncode == 0, result.stderr
    return out, result


def test_every_frame_gets_one_line_and_bad_files_get_an_error(first_run, inputs):
    out, result = first_run
    lines = read_lines(out / "results.jsonl")
    photos = [l for l in lines if "frame" not in l]
    assert sorted(Path(l["path"]).name for l in photos) == sorted(FRAMES + ["broken.jpg", "missing.jpg"])
    errors = {Path(l["path"]).name: l["error"] for l in photos if "error" in l}
    assert set(errors) == {"broken.jpg", "missing.jpg"} and "No such file" in errors["missing.jpg"]
    assert all(l["width"] == 1360 and l["height"] == 800 and "signs" in l for l in photos if "error" not in l)
    video = [l for l in lines if "frame" in l]
    assert [l["frame"] for l in video] == list(range(6)) and [l["time_s"] for l in video] == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert "frames/s" in result.stderr
    assert len(list((out / "boxed").rglob("*.jpg"))) == len(FRAMES) + 6


def test_the_command_answers_as_the_service_does(first_run, inputs, checkpoint_snapshot):
    """The same frames POSTed to /v1/detect of a service on the same checkpoints (both on torch)."""
    from conftest import app_client
    from helpers import files

    lines = {Path(l["path"]).name: l for l in read_lines(first_run[0] / "results.jsonl") if "frame" not in l}
    with app_client(checkpoint_snapshot) as client:
        for name in FRAMES:
            response = client.post("/v1/detect", files=files((name, (GTSDB / name).read_bytes())))
            assert response.status_code == 200, response.text
            want, got = response.json()["results"][0]["signs"], lines[name]["signs"]
            assert len(got) == len(want) > 0, (name, got, want)
            for g, w in zip(got, want):
                assert (g["class_id"], g["label"], g["group"]) == (w["class_id"], w["label"], w["group"])
                assert g["box"] == pytest.approx(w["box"], abs=0.2)
                assert g["score"] == pytest.approx(w["score"], abs=1e-4)
                assert g["probability"] == pytest.approx(w["probability"], abs=1e-4)


def test_a_video_sign_keeps_one_track_across_frames(first_run):
    out, _ = first_run
    video = [l for l in read_lines(out / "results.jsonl") if "frame" in l]
    tracks = read_lines(out / "tracks.jsonl")
    assert tracks and all(t["path"].endswith("drive.mp4") for t in tracks)
    # each picture is in the video twice: every sign of frame 2k is the same track in frame 2k+1
    for even, odd in zip(video[::2], video[1::2]):
        assert [s["track"] for s in even["signs"]] == [s["track"] for s in odd["signs"]]
    by_id = {t["track"]: t for t in tracks}
    for line in video:
        for sign in line["signs"]:
            track = by_id[sign["track"]]
            assert track["first_time_s"] <= line["time_s"] <= track["last_time_s"]
    first_sign = video[0]["signs"][0]
    track = by_id[first_sign["track"]]
    assert (track["label"], track["frames"], track["first_time_s"], track["last_time_s"]) == \
        (first_sign["label"], 2, 0.0, 0.2)


def test_a_second_run_resumes_without_a_line_twice(first_run, inputs, checkpoint_snapshot, tmp_path):
    out, _ = first_run
    results = tmp_path / "results.jsonl"
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    # as if killed: the first lines written whole, the next one torn mid-write
    results.write_text("".join(lines[:3]) + lines[3][:40])
    shutil.copy(out / "tracks.jsonl", tmp_path / "tracks.jsonl")
    result = signserve("detect", str(inputs / "photos"), str(inputs / "drive.mp4"), str(inputs / "missing.jpg"),
                       "-o", str(results), "--tracks", str(tmp_path / "tracks.jsonl"), "--fps", "5",
                       "--checkpoint-dir", str(checkpoint_snapshot), "--backend", "torch", "--no-progress")
    assert result.returncode == 0, result.stderr
    again = read_lines(results)
    keys = [(l["path"], l.get("frame")) for l in again]
    assert len(keys) == len(set(keys)) == len(lines)
    assert sorted(keys) == sorted((l["path"], l.get("frame")) for l in map(json.loads, lines))
    assert read_lines(tmp_path / "tracks.jsonl") == read_lines(out / "tracks.jsonl")  # not written twice


def test_csv_output_and_shards_merge(inputs, checkpoint_snapshot, tmp_path):
    files = list_inputs([inputs / "photos"])
    assert [shard(files, i, 3) for i in range(3)] == [shard(list(reversed(files)), i, 3)[::-1] for i in range(3)]
    assert sorted(p for i in range(3) for p in shard(files, i, 3)) == sorted(files)
    output = tmp_path / "results.csv"
    for index in range(2):
        result = signserve("detect", str(inputs / "photos"), "-o", str(tmp_path / f"results.shard-{index}-of-2.csv"),
                           "--shard", f"{index}/2", "--checkpoint-dir", str(checkpoint_snapshot),
                           "--backend", "torch", "--no-progress", "--workers", "2")  # worker processes (the others: in-process)
        assert result.returncode == 0, result.stderr
    merged = signserve("merge", str(output), "--shards", "2")
    assert merged.returncode == 0, merged.stderr
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {Path(r["path"]).name for r in rows} == set(FRAMES) | {"broken.jpg"}
    assert all(r["label"] and float(r["probability"]) > 0 for r in rows if not r["error"])
    assert done_keys(output) == {(str(p), None) for p in files}


def test_tracker_and_torn_lines_in_isolation(tmp_path):
    tracker = IouTracker(min_iou=0.3, max_gap=1)
    sign = {"box": [10, 10, 30, 30], "score": 0.9, "class_id": 1, "label": "a", "probability": 0.9}
    for frame in range(3):
        tracker.update([dict(sign)], frame, frame / 10)
    tracker.update([], 3, 0.3)
    tracker.update([], 4, 0.4)
    tracker.update([dict(sign, box=[200, 200, 220, 220])], 5, 0.5)
    assert [(t.id, t.frames) for t in tracker.finish()] == [(1, 3), (2, 1)]
    torn = tmp_path / "x.jsonl"
    torn.write_bytes(b'{"path": "a"}\n{"pa')
    cut_torn_tail(torn)
    assert torn.read_bytes() == b'{"path": "a"}\n'


def test_without_slurm_the_cluster_target_says_so(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no sbatch there in a plain image; skip where it is
    if shutil.which("sbatch", path=env["PATH"]):
        env["PATH"] = str(tmp_path)
        (tmp_path / "bash").symlink_to(shutil.which("bash"))
        for tool in ("dirname", "realpath", "mkdir"):
            (tmp_path / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(["bash", "batch/slurm/submit.sh", str(tmp_path), str(tmp_path / "o.jsonl"), "2"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and "no Slurm here" in result.stderr and "signserve detect" in result.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("sbatch") and shutil.which("sinfo")),
                    reason="no Slurm client on the PATH (CI installs slurm-wlm and runs .ci/slurm/start.sh)")
def test_make_detect_cluster_leaves_one_merged_file(inputs, checkpoint_snapshot, tmp_path):
    output = tmp_path / "merged.jsonl"
    result = subprocess.run(["make", "--no-print-directory", "detect-cluster", f"INPUT={inputs / 'photos'}",
                             f"OUTPUT={output}", "SHARDS=2",
                             f"ARGS=--checkpoint-dir {checkpoint_snapshot} --backend torch"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    array = re.search(r"^submitted job array (\d+)", result.stdout, re.MULTILINE).group(1)
    merge = re.search(r"^submitted merge job (\d+)", result.stdout, re.MULTILINE).group(1)
    deadline = time.monotonic() + 600
    while not output.exists():
        state = subprocess.run(["scontrol", "show", "job", "--oneliner", merge], capture_output=True,
                               text=True, timeout=30).stdout
        assert not any(bad in state for bad in ("JobState=FAILED", "JobState=CANCELLED", "DependencyNeverSatisfied")), \
            (state, list((ROOT / "logs").glob(f"signserve-*{array}*")))
        assert time.monotonic() < deadline, state
        time.sleep(2)
    lines = read_lines(output)
    names = [Path(l["path"]).name for l in lines]
    assert sorted(names) == sorted(FRAMES + ["broken.jpg"])  # every file exactly once
