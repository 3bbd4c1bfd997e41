"""`python -m bench` (or `make bench`): the service under HTTP load, next to what bounds it.

For each model, at concurrency 1 and 32 (closed loop, wrk with keep-alive connections, one image
per request as multipart/form-data, loopback only):

- service:  `python -m app`, the real service with its dynamic batcher;
- plain:    a hand-written per-request FastAPI handler, no batching (bench/plain_handler.py);
- litserve: the same checkpoint served by LitServe with its own dynamic batching (bench/litserve_peer.py);
- bare:     the model's batched forward pass alone (bench/forward.py) on the backend the service
            chose, right before and right after the service's runs of that model;
- backends: each backend's bare forward (bench/backends.py), in one interleaved run;
- the route's own work in this process (multipart parsing, decoding, the answer), for the floor;
and once:
- ceiling:  a minimal FastAPI endpoint that only receives the upload (bench/receive_only.py).

Prints a table, the ratios the service is held to and the CPU budget and floor behind the
throughput target (bench/report.py), and writes artifacts/bench.json.
Every server runs alone while it is measured; nothing else should load the machine meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from app import imaging
from app.engine import select_device
from app.kinds import kind_of
from app.schemas.predict import predict_response
from app.service import ExecutionPlan, execution_plan, worker_pool
from app.settings import Settings
from app.uploads import FILE_FIELD, read_files
from bench import forward, harness
from bench.backends import backend_rates, service_backend
from bench.report import print_table, summarize
from models.backends import BackendRecord
from models.checkpoint import LoadedModel, load_checkpoint, served_checkpoints
from models.classes import NUM_CLASSES
from models.paths import default_data_root

ROOT = harness.ROOT


def sample_png() -> tuple[bytes, str]:
    """A real GTSRB test image as PNG (a synthetic one when the data set is absent)."""
    from PIL import Image

    from torchvision.datasets import GTSRB

    try:
        test = GTSRB(root=default_data_root(), split="test")
        image, name = test[0][0].convert("RGB"), Path(test._samples[0][0]).with_suffix(".png").name
    except RuntimeError:  # torchvision's "Dataset not found"
        image, name = Image.effect_noise((48, 48), 64).convert("RGB"), "noise.png"
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue(), name


def request_work_cpu_ms(body: bytes, boundary: str, loaded: LoadedModel, settings: Settings,
                        seconds: float = 1.0) -> float:
    """CPU per request of what the route does besides HTTP and the forward, with the service's own
    code: parse the multipart body (app.uploads), decode the image (app.imaging), build and serialise
    a top-5 answer (app.schemas.predict.predict_response)."""
    content_type = f"multipart/form-data; boundary={boundary}"
    ranked = [(list(range(NUM_CLASSES)), [1 / NUM_CLASSES] * NUM_CLASSES, 1.0)]

    async def one() -> str:
        async def chunks():
            yield body

        uploads = await read_files(content_type, str(len(body)), chunks(), field_name=FILE_FIELD,
                                   max_files=settings.max_files_per_request, max_bytes=settings.max_upload_bytes)
        imaging.decode(uploads[0].data, uploads[0].filename, loaded.preprocessing, settings.max_image_pixels)
        return predict_response(loaded, uploads, ranked, top_k=5).model_dump_json()

    async def timed() -> float:
        await one()
        count, started, wall = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - wall < seconds:
            await one()
            count += 1
        return (time.process_time() - started) / count * 1e3

    return asyncio.run(timed())


def bare_forward_rates(path: Path, loaded: LoadedModel, settings: Settings, plan: ExecutionPlan,
                       backend: BackendRecord) -> dict[str, forward.Rate]:
    """Configuration -> batched forward rate of one model: one forward at a time on all torch threads,
    and the service's own plan (its worker processes, fed from one event loop, or its threads)."""
    batch_size = settings.max_batch_size
    plan_label = (f"{plan.instances} {'processes' if plan.processes else 'threads'} x "
                  f"{plan.torch_threads or torch.get_num_threads()} torch threads, batch {batch_size}")
    single_label = f"1 forward x {torch.get_num_threads()} torch threads, batch {batch_size}"
    kind, batch = kind_of(loaded), forward.random_batch(batch_size, loaded.preprocessing.input_size)
    handler = kind.handler(loaded, half=settings.half, channels_last=settings.channels_last, backend=backend,
                           threads=torch.get_num_threads())
    rates = {single_label: forward.images_per_second(handler, batch)}
    if plan.processes:
        pool = worker_pool(settings.model_copy(update={"warmup": True}), plan, loaded.device, {loaded.name: path},
                           {loaded.name: backend})
        pool.start()

        async def pool_rate() -> forward.Rate:  # one event loop, as in the service
            try:
                return await forward.concurrent_images_per_second_async(
                    pool.forward(loaded.name), batch, plan.instances, 3.0)
            finally:
                await pool.close()

        rates[plan_label] = asyncio.run(pool_rate())
    else:
        plan_handler = kind.handler(loaded, half=settings.half, channels_last=settings.channels_last,
                                    backend=backend, threads=plan.torch_threads)
        rates[plan_label] = forward.images_per_second(plan_handler, batch, instances=plan.instances,
                                                      threads=plan.torch_threads)
    for config, rate in rates.items():
        print(f"  {loaded.name} ({handler.backend}): {config}: {rate.images_per_s:.0f} images/s, machine CPU "
              f"{rate.machine_cpu_ms_per_image:.2f} ms/image", flush=True)
    return rates


def batch_totals(metrics_url: str, model: str) -> tuple[float, float]:
    """(images, forward passes) so far, from the service's Prometheus batch-size histogram."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = {}
    for suffix in ("sum", "count"):
        prefix = f'signserve_batch_size_{suffix}{{model="{model}"}} '
        totals[suffix] = next(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))
    return totals["sum"], totals["count"]


def measure(url: str, connections: list[int], duration_s: int, warmup_s: int, body: Path, boundary: str,
            server_pid: int, batches: Callable[[], tuple[float, float]] | None = None) -> dict:
    """wrk runs, each with the CPU it cost: the server's processes alone, and the whole machine
    (server, wrk and anything else) per request, and how busy the cores were; with `batches`
    (the service), also the mean number of images per forward pass."""
    results = {}
    for c in connections:
        if warmup_s > 0:
            harness.run_wrk(url, c, warmup_s, body, boundary)
        server_before, (busy_before, idle_before) = harness.process_tree_cpu_seconds(server_pid), \
            harness.machine_cpu_seconds()
        batches_before = batches() if batches else None
        results[str(c)] = run = harness.run_wrk(url, c, duration_s, body, boundary)
        if batches:
            images, forwards = (now - then for now, then in zip(batches(), batches_before))
            run["mean_batch_size"] = images / max(forwards, 1)
        busy, idle = (now - then for now, then in zip(harness.machine_cpu_seconds(), (busy_before, idle_before)))
        served = max(1, run["requests"])
        run["server_cpu_ms_per_request"] = (harness.process_tree_cpu_seconds(server_pid) - server_before) / served * 1e3
        run["machine_cpu_ms_per_request"] = busy / served * 1e3
        run["machine_busy"] = busy / max(busy + idle, 1e-9)
        print(f"  {url:60s} c={c:<3d} {run['requests_per_s']:8.1f} req/s  p50 {run['p50_ms']:6.2f} ms  "
              f"p95 {run['p95_ms']:6.2f}  p99 {run['p99_ms']:6.2f}  errors {run['errors']}  CPU/request: server "
              f"{run['server_cpu_ms_per_request']:.2f} ms, machine {run['machine_cpu_ms_per_request']:.2f} ms "
              f"({run['machine_busy']:.0%} busy)" +
              (f", mean batch {run['mean_batch_size']:.1f}" if "mean_batch_size" in run else ""), flush=True)
    return results


def loadavg() -> float:
    return os.getloadavg()[0]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=Settings().checkpoint_dir)
    parser.add_argument("--models", nargs="*", help="checkpoint stems (default: all served)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each run (0: none)")
    parser.add_argument("--backend-seconds", type=float, default=6.0,
                        help="seconds of the interleaved run timing every backend's bare forward")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench.json")
    return parser.parse_args()


def new_report(settings: Settings, args: argparse.Namespace, image: bytes, filename: str, plan: ExecutionPlan) -> dict:
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device": str(select_device(settings.device)), "loadavg_start": loadavg(),
                    "service_plan": asdict(plan)},
        "settings": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                     "duration_s": args.duration, "upload_bytes": len(image), "image": filename},
        "ceiling": {}, "models": {},
    }
    if report["machine"]["loadavg_start"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {report['machine']['loadavg_start']:.1f} before the bench; something "
              f"else is using the CPU and the numbers will be pessimistic", file=sys.stderr)
    return report


class Bench:
    """One bench run: the servers it starts, the wrk runs against them, and the bare forwards."""

    def __init__(self, args: argparse.Namespace, settings: Settings, plan: ExecutionPlan, paths: list[Path],
                 work: Path, body: Path, boundary: str) -> None:
        self.args, self.settings, self.plan, self.work = args, settings, plan, work
        self.body, self.boundary = body, boundary
        self.path_of = {p.stem: p for p in paths}
        self.loaded = {p.stem: load_checkpoint(p, device=select_device(settings.device), name=p.stem) for p in paths}
        # The machine's speed drifts by up to ~25 % within minutes (a shared host), so each model's bare
        # forward is measured right before and right after its service runs, and the bound takes the
        # faster of the two: a slow spell while the forward alone ran must not make the service look good.
        self.rounds: dict[str, list[dict[str, forward.Rate]]] = {p.stem: [] for p in paths}
        self.backends: dict[str, BackendRecord] = {}  # the backend the service runs each model on

    def bare_forward(self, name: str) -> None:
        print(f"  bare batched forward ({'before' if not self.rounds[name] else 'after'} the service runs):",
              flush=True)
        self.rounds[name].append(bare_forward_rates(self.path_of[name], self.loaded[name], self.settings, self.plan,
                                                    self.backends[name]))

    def serve_and_measure(self, name: str, command: list[str], port: int, ready: str, urls: dict[str, str],
                          env: dict[str, str] | None = None, batched: bool = False,
                          bracket: Callable[[str], None] | None = None) -> dict:
        """`urls` maps a key (the model name, for the service) to a path; `batched`: read batch sizes;
        `bracket(key)` runs right before and right after each key's runs."""
        server = harness.start(name, command, port, ready, env=env, log_dir=self.work, chosen=ready == "/readyz")
        results = {}
        try:
            for key, path in urls.items():
                if bracket:
                    bracket(key)
                results[key] = measure(server.url + path, self.args.concurrency, self.args.duration, self.args.warmup,
                                       self.body, self.boundary, server.process.pid,
                                       functools.partial(batch_totals, server.url + "/metrics", key) if batched
                                       else None)
                if bracket:
                    bracket(key)
            return results
        finally:
            server.stop()

    def ceiling(self) -> dict:
        print("HTTP ceiling (receive-only FastAPI endpoints):", flush=True)
        port = harness.free_port()
        return self.serve_and_measure("receive-only", harness.uvicorn_command("bench.receive_only:app", port), port,
                                      "/healthz", {"upload": "/v1/predict", "raw_body": "/raw"})

    def service(self) -> dict:
        print("service (python -m app):", flush=True)
        port = harness.free_port()
        return self.serve_and_measure(
            "service", [sys.executable, "-m", "app"], port, "/readyz",
            {name: f"/v1/predict?model={name}" for name in self.path_of},
            env={"SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
                 "SIGNSERVE_CHECKPOINT_DIR": str(self.args.checkpoint_dir)}, batched=True, bracket=self.bare_forward)

    def plain(self, name: str) -> dict:
        port = harness.free_port()
        command = harness.uvicorn_command("bench.plain_handler:create_app", port, factory=True)
        return self.serve_and_measure(f"plain-{name}", command, port, "/healthz", {"plain": "/v1/predict"},
                                      env={"BENCH_CHECKPOINT": str(self.path_of[name])})["plain"]

    def litserve(self, name: str) -> dict:
        port = harness.free_port()
        command = [sys.executable, "-m", "bench.litserve_peer", str(port)]
        return self.serve_and_measure(f"litserve-{name}", command, port, "/health", {"litserve": "/v1/predict"},
                                      env={"BENCH_CHECKPOINT": str(self.path_of[name]),
                                           "BENCH_MAX_BATCH_SIZE": str(self.settings.max_batch_size)})["litserve"]

    def bare_forward_summary(self, name: str) -> dict:
        rounds = self.rounds[name]
        configs = rounds[0]
        return {"bare_forward_rounds": [{config: asdict(rate) for config, rate in r.items()} for r in rounds],
                "bare_forward_images_per_s": {c: max(r[c].images_per_s for r in rounds) for c in configs},
                "bare_forward_machine_cpu_ms_per_image": {c: min(r[c].machine_cpu_ms_per_image for r in rounds)
                                                          for c in configs}}


def main() -> None:
    args = parse_args()
    harness.wrk_available()
    settings = Settings(checkpoint_dir=args.checkpoint_dir)
    # the classifiers: /v1/predict's models (the detector has its own bench, bench/detect.py)
    paths = [p for p in served_checkpoints(args.checkpoint_dir) if (not args.models or p.stem in args.models)
             and kind_of(load_checkpoint(p)).classifies]
    if not paths:
        raise SystemExit(f"no checkpoints to bench in {args.checkpoint_dir}")
    work = ROOT / ".bench"
    work.mkdir(exist_ok=True)
    image, filename = sample_png()
    body, boundary = harness.multipart_body(image, filename, work)
    plan = execution_plan(settings, select_device(settings.device))
    report = new_report(settings, args, image, filename, plan)
    bench = Bench(args, settings, plan, paths, work, body, boundary)
    threads = plan.torch_threads or torch.get_num_threads()
    for name, loaded in bench.loaded.items():
        handling = request_work_cpu_ms(body.read_bytes(), boundary, loaded, settings)
        report["models"][name] = {"request_work_cpu_ms": handling}
        print(f"  {name}: parsing, decoding and answering one upload in-process {handling:.2f} ms CPU", flush=True)
        backend = bench.backends[name] = service_backend(loaded, settings, threads)
        rates = backend_rates(loaded, settings, threads, seconds=args.backend_seconds)
        report["models"][name]["backend"] = backend.to_dict()
        report["models"][name]["backend_bare_forward_images_per_s"] = rates
        print(f"  {name}: the service runs {backend.label} ({backend.reason}); each backend's bare forward, "
              f"{threads} thread(s), batch {settings.max_batch_size}, one run: " +
              ", ".join(f"{label} {rate:.0f}/s" for label, rate in rates.items()), flush=True)

    report["ceiling"] = bench.ceiling()
    for name, runs in bench.service().items():
        report["models"][name]["service"] = runs
    print("plain per-request handler (no batching):", flush=True)
    for name, model in report["models"].items():
        model["plain"] = bench.plain(name)
    print("LitServe (its own dynamic batching):", flush=True)
    for name, model in report["models"].items():
        model["litserve"] = bench.litserve(name)
        model.update(bench.bare_forward_summary(name))
    report["machine"]["loadavg_end"] = loadavg()
    top = max(args.concurrency)
    report["summary"] = summarize(report, top)
    print_table(report, args.concurrency, top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - start:.0f} s")
