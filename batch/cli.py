"""signserve: find and name every traffic sign in folders of photos and in videos.

    signserve detect photos/ dashcam.mp4 -o results.jsonl          # JSON lines (or results.csv)
    signserve detect photos/ -o results.jsonl --draw boxed/        # and annotated copies
    signserve detect drive.mp4 --fps 2 -o frames.jsonl --tracks tracks.jsonl
    signserve merge results.jsonl --shards 8                       # after a Slurm array (make detect-cluster)

One line per photo or sampled video frame: path, width, height and `signs` exactly as POST
/v1/detect answers them, plus `frame` and `time_s` for video frames; a file that cannot be read gets
a line with `error` and the run goes on. Running the same command again on the same output skips
what is done, so an interrupted run (Ctrl-C, a killed Slurm task) continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from batch.frames import Frame, frames_of
from batch.output import ResultWriter, done_keys, is_csv, line_key
from batch.sources import is_video, list_inputs, shard
from batch.tracks import IouTracker
from models.paths import checkpoint_dir


def detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="find and name the signs in photos, folders and videos",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="image files, folders (searched recursively), video files")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="results file: JSON lines (.jsonl), or CSV (.csv: one row per sign)")
    p.add_argument("--classifier", help="checkpoint name that names the boxes (default: as /v1/detect, the one "
                                        "the detector's operating point was chosen with)")
    p.add_argument("--min-score", type=float, default=None,
                   help="keep boxes whose detector score is at least this (default: the detector's threshold)")
    p.add_argument("--fps", type=float, default=None, help="video frames per second to look at (default: every frame)")
    p.add_argument("--draw", type=Path, default=None, metavar="DIR", help="write annotated copies (JPEG) here")
    p.add_argument("--tracks", type=Path, default=None, metavar="FILE",
                   help="videos: one JSON line per tracked sign (class by vote, first/last time, best frame)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="where the detector and classifiers are (default: $SIGNSERVE_CHECKPOINT_DIR or "
                        "models/checkpoints)")
    p.add_argument("--backend", default=None,
                   help="runtime request as SIGNSERVE_BACKEND (default: its value, else auto: the fastest "
                        "that passes parity, chosen once per machine and cached)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that each hold the models and take whole chunks of frames (default 1: "
                        "the models run in this process on every core; each worker takes ~5 s to start)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: the cores shared out among the workers)")
    p.add_argument("--shard", default=None, metavar="I/N", help="only this task's share of the files: I of N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (batch jobs get none anyway)")
    p.set_defaults(run=run_detect)


def merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="join the shard files of a job array into one output")
    p.add_argument("output", type=Path, help="the merged file; shards are OUTPUT.shard-I-of-N")
    p.add_argument("--shards", type=int, required=True)
    p.set_defaults(run=run_merge)


def shard_path(output: Path, index: int, shards: int) -> Path:
    return output.with_name(f"{output.stem}.shard-{index}-of-{shards}{output.suffix}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard takes I/N (e.g. 3/8), got {text!r}") from None
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text}: I must be in 0..N-1")
    return index, count


def draw(frame: Frame, signs: list[dict], folder: Path, root: Path) -> None:
    from PIL import ImageDraw

    image = frame.scene.image.copy()
    sx, sy = frame.scene.scale
    pen = ImageDraw.Draw(image)
    for sign in signs:
        x1, y1, x2, y2 = sign["box"]
        box = (x1 / sx, y1 / sy, x2 / sx, y2 / sy)
        pen.rectangle(box, outline=(255, 40, 40), width=3)
        pen.text((box[0], max(0, box[1] - 12)), f"{sign['label']} {sign['probability']:.2f}", fill=(255, 255, 0))
    try:
        relative = frame.path.resolve().relative_to(root)
    except ValueError:
        relative = Path(frame.path.name)
    target = folder / relative.with_suffix("") if frame.index is not None else folder / relative.with_suffix(".jpg")
    if frame.index is not None:
        target = target / f"frame-{frame.index:06d}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, quality=90)


def expected_frames(paths: list[Path], fps: float | None) -> int | None:
    """Frames the run will look at, for the progress bar's ETA (None when a video does not say)."""
    total = 0
    for path in paths:
        if not is_video(path):
            total += 1
            continue
        try:
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                seconds = float(stream.duration * stream.time_base) if stream.duration else None
                count = stream.frames or (seconds and seconds * float(stream.average_rate or 0))
                total += int(seconds * fps) + 1 if fps and seconds else int(count or 0)
        except Exception:
            return None
    return total


def run_detect(args: argparse.Namespace) -> int:
    from batch.detect import Answerer, chunks, cores, load_models, split_cores

    if args.tracks is not None and is_csv(args.output):
        raise SystemExit("--tracks needs JSON-lines output (-o FILE.jsonl): tracks are rebuilt from it on resume")
    if args.fps is not None and args.fps <= 0:
        raise SystemExit(f"--fps must be positive, got {args.fps}")
    files = list_inputs(args.paths)
    if (part := parse_shard(args.shard)) is not None:
        files = shard(files, *part)
    done = done_keys(args.output)
    previous = previous_signs(args.output) if args.tracks is not None else {}
    tracked = done_tracks(args.tracks) if args.tracks is not None else set()
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}")
    workers, threads = split_cores(cores(), args.workers)
    threads = args.threads or threads
    import torch

    torch.set_num_threads(threads)
    backend = args.backend or os.environ.get("SIGNSERVE_BACKEND", "auto")
    models_dir = args.checkpoint_dir or checkpoint_dir()
    models = load_models(models_dir, args.classifier, backend, threads)  # each worker reuses these choices
    print(f"signserve detect: {len(files)} file(s), {len(done)} frame(s) already in {args.output}; detector "
          f"{models.detector.name}, classifier {models.classifier.name}, runtimes "
          f"{', '.join(f'{k} {v}' for k, v in models.runtimes.items())}, {workers} worker(s) of {threads} "
          f"thread(s)", file=sys.stderr)
    answerer = Answerer(models, workers, threads, models_dir, args.min_score)
    max_side = models.detector.preprocessing.input_size
    root = Path.cwd().resolve()
    trackers: dict[str, IouTracker] = {}

    def pending() -> Iterator[Frame]:
        for path in files:
            if is_video(path) or (str(path), None) not in done:  # a video's done frames replay its tracks
                yield from frames_of(path, max_side, args.fps)

    progress = tqdm(total=expected_frames(files, args.fps), unit="frame", disable=args.no_progress or None,
                    initial=len(done), dynamic_ncols=True)
    started, count = time.perf_counter(), 0
    tracks_out = open(args.tracks, "a") if args.tracks is not None else None
    try:
        with ResultWriter(args.output) as out:
            def fresh(chunk: list[Frame]) -> list[Frame]:
                return [f for f in chunk if f.scene is not None and f.key not in done]

            for chunk, answers in answerer.answered(chunks(pending()), fresh):
                for frame in chunk:
                    path = str(frame.path)
                    if frame.index is not None and args.tracks is not None and path not in tracked:
                        trackers.setdefault(path, IouTracker())
                        close_finished(trackers, path, tracks_out, tracked)
                    if frame.key in done:  # an earlier run's frame: only its tracks are replayed
                        if frame.index is not None and path in trackers:
                            trackers[path].update(previous.get(frame.key, []), frame.index, frame.time_s or 0.0)
                        continue
                    record: dict = {"path": path}
                    if frame.index is not None:
                        record.update(frame=frame.index, time_s=frame.time_s)
                    if frame.scene is None:
                        record["error"] = frame.error
                    else:
                        signs = answers[id(frame)]
                        if frame.index is not None and path in trackers:
                            trackers[path].update(signs, frame.index, frame.time_s or 0.0)
                        record.update(width=frame.scene.original_size[0], height=frame.scene.original_size[1],
                                      signs=signs)
                        if args.draw is not None:
                            draw(frame, signs, args.draw, root)
                    out.write(record)
                    count += 1
                    progress.update(1)
            close_finished(trackers, None, tracks_out, tracked)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {count} frame(s) written; run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        answerer.close()
        progress.close()
        if tracks_out is not None:
            tracks_out.close()
    seconds = time.perf_counter() - started
    print(f"signserve detect: {count} frame(s) in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} frames/s) "
          f"-> {args.output}", file=sys.stderr)
    return 0


def close_finished(trackers: dict[str, IouTracker], current: str | None, out, tracked: set[str]) -> None:
    """Write the tracks of every video other than `current` (all when None): they have ended."""
    for path in [p for p in trackers if p != current]:
        for track in trackers.pop(path).finish():
            out.write(json.dumps(track.summary(path), separators=(",", ":")) + "\n")
        out.flush()
        tracked.add(path)


def previous_signs(output: Path) -> dict[tuple[str, int | None], list[dict]]:
    """The signs of the video frames already in `output`, to rebuild the tracks on resume."""
    if not output.is_file():
        return {}
    with open(output) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {line_key(r): [dict(s) for s in r.get("signs", [])] for r in records if r.get("frame") is not None}


def done_tracks(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    with open(path) as f:
        return {json.loads(line)["path"] for line in f if line.endswith("\n") and line.strip()}


def run_merge(args: argparse.Namespace) -> int:
    """Every shard's lines, each frame once, into OUTPUT (written whole, then renamed)."""
    from models.atomic import atomic_write_text

    seen, lines, header = set(), [], None
    for index in range(args.shards):
        part = shard_path(args.output, index, args.shards)
        if not part.is_file():
            raise SystemExit(f"missing shard {part}: its task has not finished (rerun it; it resumes)")
        if is_csv(args.output):
            text = part.read_text().splitlines(keepends=True)
            header, rows = text[0], text[1:]
            lines += [row for row in rows if row.strip()]
            continue
        done_keys(part)  # cuts a torn last line
        for line in part.read_text().splitlines(keepends=True):
            key = line_key(json.loads(line))
            if key not in seen:
                seen.add(key)
                lines.append(line)
    atomic_write_text((header or "") + "".join(lines), args.output)
    print(f"signserve merge: {len(lines)} line(s) from {args.shards} shard(s) -> {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    detect_parser(sub)
    merge_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
