"""ONNX Runtime's memory arena with the detector's any-size frames: resident memory of a process that
runs large batches then small ones, and the time of a 2-frame run, for the arena kept (ONNX Runtime's
default), switched off, and as served (models.backends.onnxruntime_forward shrinks it after each run
for inputs of dynamic height and width).

    python -m bench.arena            # each variant in its own process, one thread
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [(2, 800, 1376), (8, 800, 1376), (8, 1360, 1376), (2, 800, 1376), (1, 400, 688)]
VARIANTS = {"kept": "kept (ONNX Runtime default)", "off": "switched off", "served": "shrunk after each run (served)"}


def resident_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def forward_for(path: str, variant: str):
    """The forward a variant runs: the service's own, or a plain session with the arena kept or off."""
    import onnxruntime as ort

    if variant == "served":
        from models.backends import onnxruntime_forward

        return onnxruntime_forward(path, threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_cpu_mem_arena = variant == "kept"
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def run(path: str, variant: str) -> None:
    import torch

    forward = forward_for(path, variant)
    sizes = []
    for n, h, w in SHAPES:
        forward(torch.randn(n, 3, h, w))
        sizes.append(resident_mb())
    x = torch.randn(2, 3, 800, 1376)
    forward(x)
    started = time.perf_counter()
    for _ in range(3):
        forward(x)
    ms = (time.perf_counter() - started) / 3 * 1000
    print(f"| {VARIANTS[variant]} | " + " | ".join(str(s) for s in sizes) + f" | {ms:.0f} |", flush=True)


def main() -> None:
    if len(sys.argv) == 3:
        run(sys.argv[1], sys.argv[2])
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
        for variant in VARIANTS:
            subprocess.run([sys.executable, "-m", "bench.arena", path, variant], check=True)


if __name__ == "__main__":
    main()
