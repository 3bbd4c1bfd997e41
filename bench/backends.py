"""Each backend's bare batched forward (models.backends) next to the one the service chose, measured in
one interleaved run with the service's threads per forward, so their ratios hold on a drifting machine.

    python -m bench.backends                      # every served checkpoint
    python -m bench.backends --models cnn --seconds 3

`make bench` calls the same functions; this entry point runs them alone (no HTTP, no wrk).
The last stdout line is JSON: {model: {"served": label, "reason": str, "images_per_s": {label: float},
"test_accuracy": {label: float}}}.
"""

from __future__ import annotations

import argparse
import json

import torch

from app.engine import choose_backend, select_device
from app.kinds import kind_of
from app.service import execution_plan
from app.settings import Settings
from models.backends import (BackendRecord, build_forward, candidates, cpu_flags, export_candidate,
                             images_per_second)
from models.checkpoint import LoadedModel, load_checkpoint, served_checkpoints


def service_backend(loaded: LoadedModel, settings: Settings, threads: int) -> BackendRecord:
    """The record the service serves `loaded` with (the same call, so the same cache entry)."""
    return choose_backend(loaded, settings.backend, cache_dir=settings.backend_cache_dir,
                          batch_size=settings.max_batch_size, parity_images=settings.backend_parity_images,
                          threads=threads, half=settings.half)


def backend_rates(loaded: LoadedModel, settings: Settings, threads: int, seconds: float = 3.0) -> dict[str, float]:
    """Candidate label -> images/s of its bare forward on a batch of real test images (the service's
    batch size), every candidate the CPU offers, in `threads` intra-op threads. A candidate that fails
    to export or load is reported as 0."""
    selection = kind_of(loaded).selection(loaded, settings.backend_cache_dir, settings.max_batch_size,
                                          parity_images=settings.max_batch_size)
    module, job = selection.module, selection.job  # what the service runs and exports
    forwards = {}
    rates: dict[str, float] = {}
    for candidate in candidates("auto", loaded.device, cpu_flags(), settings.half, int8=job.int8):
        try:
            artifact = None if candidate.backend == "torch" else export_candidate(candidate, module, job)
            record = BackendRecord.for_artifact(candidate.backend, candidate.precision, artifact)
            forwards[candidate.label] = build_forward(record, module, loaded.device, threads)
        except Exception as exc:
            print(f"  {loaded.name}: {candidate.label} unavailable: {type(exc).__name__}: {exc}", flush=True)
            rates[candidate.label] = 0.0
    with torch.inference_mode():
        rates.update(images_per_second(forwards, job.measure_batch, seconds, threads))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="checkpoint stems (default: all served)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the interleaved timing run")
    args = parser.parse_args()
    settings = Settings()
    plan = execution_plan(settings, select_device(settings.device))
    threads = plan.torch_threads or torch.get_num_threads()
    report = {}
    for path in served_checkpoints(settings.checkpoint_dir):
        if args.models and path.stem not in args.models:
            continue
        loaded = load_checkpoint(path, device=select_device(settings.device), name=path.stem)
        if not kind_of(loaded).classifies:
            continue  # whole frames: python -m bench.detect
        chosen = service_backend(loaded, settings, threads)
        rates = backend_rates(loaded, settings, threads, args.seconds)
        report[path.stem] = {"served": chosen.label, "reason": chosen.reason, "images_per_s": rates,
                             "test_accuracy": chosen.test_accuracy}
        print(f"{path.stem}: serves {chosen.label} ({chosen.reason}); test accuracy {chosen.test_accuracy}")
        for label, rate in rates.items():
            print(f"  {label:18s} {rate:8.0f} images/s  ({rate / rates['torch-fp32']:.2f}x torch fp32)"
                  f"{'  <- served' if label == chosen.label else ''}")
    print(f"{threads} thread(s) per forward, batch {settings.max_batch_size} of real test images")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
