"""Batch detection against the service, on the same frames in one run.

    python -m bench.batch_detect --frames 100     # writes artifacts/bench-batch-detect.json

First `python -m app` on the shipped checkpoints: every frame once unmeasured, then again one
request at a time (what a script calling POST /v1/detect in a loop gets), frames per second of the
second pass. The service then stops, and `signserve detect` runs over the same files with the same
runtime request; its frames per second are the ones it reports for its detection loop (model
loading excluded, as the service's start is). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import ROOT, free_port, save_report, start
from models.gtsdb import read_ground_truth, split_frames
from models.gtsrb import default_data_root

CHECKPOINTS = ROOT / "models" / "checkpoints"


def http_frames_per_second(frames: list[Path]) -> float:
    port = free_port()
    server = start("signserve", [sys.executable, "-m", "app"], port, "/readyz",
                   env={"SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
                        "SIGNSERVE_CHECKPOINT_DIR": str(CHECKPOINTS)}, timeout_s=900, chosen=True)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for timed in (False, True):
                started = time.perf_counter()
                for frame in frames:
                    response = client.post("/v1/detect", files=[("file", (frame.name, frame.read_bytes(),
                                                                          "image/jpeg"))])
                    response.raise_for_status()
            return len(frames) / (time.perf_counter() - started)
    finally:
        server.stop()


def cli_frames_per_second(frames: list[Path]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([sys.executable, "-m", "batch.cli", "detect", *map(str, frames), "-o",
                                 str(Path(folder) / "out.jsonl"), "--checkpoint-dir", str(CHECKPOINTS),
                                 "--no-progress"], cwd=ROOT, capture_output=True, text=True, check=True)
    rate = re.search(r"\(([\d.]+) frames/s\)", result.stderr)
    if rate is None:
        raise RuntimeError(f"signserve detect did not report its rate:\n{result.stderr}")
    return float(rate.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--frames", type=int, default=100, help="GTSDB validation frames")
    p.add_argument("--output", default=str(ROOT / "artifacts" / "bench-batch-detect.json"))
    args = p.parse_args(argv)
    folder = Path(args.data_root) / "gtsdb" / "images"
    frames = [folder / f.name for f in split_frames(read_ground_truth(args.data_root), "val")][:args.frames]
    http = http_frames_per_second(frames)
    cli = cli_frames_per_second(frames)
    report = {"frames": len(frames), "http_one_by_one_fps": round(http, 2), "signserve_detect_fps": round(cli, 2),
              "ratio": round(cli / http, 2)}
    print(f"{len(frames)} GTSDB frames: POST /v1/detect one by one {http:.2f} frames/s; signserve detect "
          f"{cli:.2f} frames/s ({cli / http:.2f}x)")
    save_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
