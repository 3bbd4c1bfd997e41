"""How /v1/predict fares while /v1/detect is busy: classifier latency alone, then beside street frames.

    python -m bench.sharing                          # 4 predict clients; then beside 4 detect clients
    python -m bench.sharing --detect-frames 8 --seconds 20

Starts `python -m app` with the shipped cnn and detector (SIGNSERVE_* settings pass through, e.g.
SIGNSERVE_BACKEND=torch to skip the runtime choice), runs `--predict-clients` closed-loop clients
posting one GTSRB test image each to /v1/predict?model=cnn for `--seconds`, then the same clients
again while `--detect-clients` post `--detect-frames` GTSDB frames each to /v1/detect, and prints the
predict latency percentiles and throughput of both phases (and the detect requests completed).
Compare the two phases of one run: the machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.detect import percentile
from bench.harness import ROOT, free_port, start
from models.gtsrb import default_data_root, list_samples
from models.gtsdb import read_ground_truth, split_frames


def client_loop(url: str, path: str, files: list, stop: threading.Event, latencies: list[float],
                errors: list[int], params: dict | None = None) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = client.post(path, files=files, params=params)
            if response.status_code == 200:
                latencies.append(1000 * (time.perf_counter() - started))
            else:
                errors.append(response.status_code)


def phase(url: str, seconds: float, predict_clients: int, sign: tuple[str, bytes], detect_clients: int,
          frames: list[tuple[str, bytes]]) -> dict:
    stop = threading.Event()
    predicted: list[float] = []
    detected: list[float] = []
    errors: list[int] = []
    sign_files = [("file", (sign[0], sign[1], "image/png"))]
    frame_files = [("file", (name, data, "image/jpeg")) for name, data in frames]
    threads = [threading.Thread(target=client_loop, args=(url, "/v1/predict", sign_files, stop, predicted, errors,
                                                          {"model": "cnn"}))
               for _ in range(predict_clients)]
    threads += [threading.Thread(target=client_loop, args=(url, "/v1/detect", frame_files, stop, detected, errors))
                for _ in range(detect_clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"predict_requests_per_s": len(predicted) / seconds, "predict_p50_ms": statistics.median(predicted),
            "predict_p99_ms": percentile(predicted, 99), "detect_requests": len(detected), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--predict-clients", type=int, default=4)
    p.add_argument("--detect-clients", type=int, default=4)
    p.add_argument("--detect-frames", type=int, default=8, help="frames per detect request")
    args = p.parse_args(argv)

    path, _ = list_samples(args.data_root, "test")[0]
    sign = (Path(path).name, Path(path).read_bytes())
    folder = Path(args.data_root) / "gtsdb" / "images"
    frames = [(f.name, (folder / f.name).read_bytes())
              for f in split_frames(read_ground_truth(args.data_root), "val")[:args.detect_frames]]
    checkpoints = Path(tempfile.mkdtemp(prefix="signserve-sharing-"))
    for name in ("cnn.pt", "detector.pt"):
        shutil.copy2(ROOT / "models" / "checkpoints" / name, checkpoints / name)
    port = free_port()
    server = start("signserve", [str(ROOT / ".venv" / "bin" / "python"), "-m", "app"], port, "/readyz",
                   env={"SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
                        "SIGNSERVE_CHECKPOINT_DIR": str(checkpoints)}, timeout_s=900, chosen=True)
    try:
        phase(server.url, 3, args.predict_clients, sign, 1, frames[:1])  # warm-up, unmeasured
        alone = phase(server.url, args.seconds, args.predict_clients, sign, 0, frames)
        beside = phase(server.url, args.seconds, args.predict_clients, sign, args.detect_clients, frames)
    finally:
        server.stop()
        shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"/v1/predict (cnn), {args.predict_clients} clients, {args.seconds:g} s per phase")
    print("| phase | requests/s | p50 ms | p99 ms | detect requests done | errors |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, r in (("alone", alone),
                     (f"beside {args.detect_clients} detect clients x {args.detect_frames} frames", beside)):
        print(f"| {label} | {r['predict_requests_per_s']:.0f} | {r['predict_p50_ms']:.1f} | {r['predict_p99_ms']:.1f} "
              f"| {r['detect_requests']} | {sorted(set(r['errors'])) or '-'} |")


if __name__ == "__main__":
    main()
