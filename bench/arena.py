"""ONNX Runtime's memory arena with the detector's any-size frames: resident memory of a process that
runs large batches then small ones, with and without shrinking the arena after each run (what
models.backends.onnxruntime_forward does for inputs of dynamic height and width).

    python -m bench.arena            # each variant in its own process, one thread
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [(2, 800, 1376), (8, 800, 1376), (8, 1360, 1376), (2, 800, 1376), (1, 400, 688)]


def resident_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def run(path: str, shrink: bool) -> None:
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    if shrink:
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    name = session.get_inputs()[0].name
    sizes = []
    for n, h, w in SHAPES:
        session.run(None, {name: torch.randn(n, 3, h, w).numpy()}, run_options)
        sizes.append(resident_mb())
    x = {name: torch.randn(2, 3, 800, 1376).numpy()}
    session.run(None, x, run_options)
    started = time.perf_counter()
    for _ in range(3):
        session.run(None, x, run_options)
    ms = (time.perf_counter() - started) / 3 * 1000
    print(f"| {'shrunk after each run' if shrink else 'kept (ONNX Runtime default)'} | "
          + " | ".join(str(s) for s in sizes) + f" | {ms:.0f} |")


def main() -> None:
    if len(sys.argv) == 3:
        run(sys.argv[1], sys.argv[2] == "shrink")
        return
    from models.checkpoint import load_checkpoint
    from models.export import InputSpec, export_onnx
    from models.paths import PROJECT_ROOT

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "detector.onnx")
        loaded = load_checkpoint(PROJECT_ROOT / "models" / "checkpoints" / "detector.pt")
        export_onnx(loaded.model, InputSpec((1, 3, 800, 1376), dynamic_axes=(0, 2, 3)), path, {})
        print("| arena | " + " | ".join(f"MB after {n}x{h}x{w}" for n, h, w in SHAPES) + " | ms per 2-frame run |")
        print("| --- |" + " ---: |" * (len(SHAPES) + 1))
        for variant in ("keep", "shrink"):
            subprocess.run([sys.executable, "-m", "bench.arena", path, variant], check=True)


if __name__ == "__main__":
    main()
