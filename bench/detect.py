"""Street-scene latency: POST /v1/detect with real 1360x800 GTSDB JPEGs, one at a time.

    python -m bench.detect            # part of `make bench`; writes artifacts/bench-detect.json

Starts `python -m app` on a loopback port with the shipped checkpoints, sends every validation
frame (GTSDB 00500-00599) once as a warm-up and then again, one request at a time (concurrency 1),
and reports the latency percentiles of the timed pass. Beside it, the detector's bare forward on one
frame in this process (1 and 2 torch threads), so the share of the request spent outside the
network is visible. Compare figures within one run: the machine's speed drifts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx
import torch

from bench.harness import ROOT, free_port, save_report, start
from models.checkpoint import load_checkpoint
from models.detector import detect
from models.preprocessing import image_to_uint8
from models.gtsrb import default_data_root
from models.gtsdb import read_ground_truth, split_frames

CHECKPOINTS = ROOT / "models" / "checkpoints"


def bare_forward_ms(path: Path, frame: Path, threads: int, repeats: int = 5) -> float:
    """Median milliseconds of the detector's forward and decoding on one frame, in this process."""
    from PIL import Image

    torch.set_num_threads(threads)
    loaded = load_checkpoint(path)
    model = loaded.model.to(memory_format=torch.channels_last)
    with Image.open(frame) as image:
        batch = image_to_uint8(image, loaded.preprocessing).unsqueeze(0)
    detect(model, batch, loaded.preprocessing, min_score=0.05)  # warm-up: oneDNN builds its kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        detect(model, batch, loaded.preprocessing, min_score=0.05)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--frames", type=int, default=100, help="validation frames to send")
    p.add_argument("--output", default=str(ROOT / "artifacts" / "bench-detect.json"))
    args = p.parse_args(argv)

    folder = Path(args.data_root) / "gtsdb" / "images"
    frames = [folder / f.name for f in split_frames(read_ground_truth(args.data_root), "val")][:args.frames]
    bodies = [(f.name, f.read_bytes()) for f in frames]
    port = free_port()
    server = start("signserve", [str(ROOT / ".venv" / "bin" / "python"), "-m", "app"], port, "/readyz",
                   env={"SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
                        "SIGNSERVE_CHECKPOINT_DIR": str(CHECKPOINTS)}, timeout_s=600, chosen=True)
    try:
        latencies, signs = [], 0
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for timed in (False, True):
                for name, data in bodies:
                    started = time.perf_counter()
                    response = client.post("/v1/detect", files=[("file", (name, data, "image/jpeg"))])
                    elapsed = 1000 * (time.perf_counter() - started)
                    response.raise_for_status()
                    detector = response.json()["model"]
                    if timed:
                        latencies.append(elapsed)
                        signs += len(response.json()["results"][0]["signs"])
            models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    finally:
        server.stop()
    forward = {threads: bare_forward_ms(CHECKPOINTS / "detector.pt", frames[0], threads) for threads in (1, 2)}
    backend = models.get(detector, {}).get("backend") or {}
    report = {"frames": len(latencies), "signs_found": signs, "concurrency": 1, "backend": backend,
              "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
              "p99_ms": percentile(latencies, 99), "mean_ms": statistics.fmean(latencies),
              "bare_forward_ms": {str(k): v for k, v in forward.items()}}
    print(f"/v1/detect, one 1360x800 JPEG per request, concurrency 1, {len(latencies)} frames: "
          f"p50 {report['p50_ms']:.0f} ms, p95 {report['p95_ms']:.0f} ms, p99 {report['p99_ms']:.0f} ms "
          f"({signs} signs found; the detector's forward on {backend.get('backend', '?')}-"
          f"{backend.get('precision', '?')}: {backend.get('reason', '')})")
    print("torch fp32 detector forward + decoding on one frame in-process: " +
          ", ".join(f"{k} thread{'s' if k > 1 else ''} {v:.0f} ms" for k, v in forward.items()))
    save_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
