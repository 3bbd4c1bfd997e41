"""`python -m bench` (or `make bench`): the service under HTTP load, next to what bounds it.

For each model, at concurrency 1 and 32 (closed loop, wrk with keep-alive connections, one image
per request as multipart/form-data, loopback only):

- service:  `python -m app`, the real service with its dynamic batcher;
- plain:    a hand-written per-request FastAPI handler, no batching (bench/plain_handler.py);
- bare:     the model's batched forward pass alone (bench/forward.py) on the backend the service
            chose, right before and right after the service's runs of that model;
- backends: each backend's bare forward (bench/backends.py), in one interleaved run;
- the route's own work in this process (multipart parsing, decoding, the answer), for the floor;
and once:
- ceiling:  a minimal FastAPI endpoint that only receives the upload (bench/receive_only.py).

Prints a table, the ratios the service is held to and the CPU budget and floor behind the
throughput target, and writes artifacts/bench.json.
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
from app.engine import Predictor, select_device
from app.routers.predict import FILE_FIELD, answer
from app.service import ExecutionPlan, checkpoint_paths, execution_plan
from app.settings import Settings
from app.uploads import read_files
from app.workers import WorkerPool
from bench import forward, harness
from bench.backends import backend_rates, service_backend
from models.backends import BackendRecord
from models.checkpoint import LoadedModel, load_checkpoint
from models.classes import NUM_CLASSES

ROOT = harness.ROOT
TARGET_RATIO = 0.70  # the issue's: service throughput at c=32 over min(bare forward, HTTP ceiling)


def sample_png() -> tuple[bytes, str]:
    """A real GTSRB test image as PNG (a synthetic one when the data set is absent)."""
    from PIL import Image

    try:
        from training.data import default_data_root, list_samples

        path, _ = list_samples(default_data_root(), "test")[0]
        image, name = Image.open(path).convert("RGB"), Path(path).with_suffix(".png").name
    except (FileNotFoundError, ImportError):
        image, name = Image.effect_noise((48, 48), 64).convert("RGB"), "noise.png"
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue(), name


def request_work_cpu_ms(body: bytes, boundary: str, loaded: LoadedModel, settings: Settings,
                        seconds: float = 1.0) -> float:
    """CPU per request of what the route does besides HTTP and the forward, with the service's own
    code: parse the multipart body (app.uploads), decode the image (app.imaging), build and serialise
    a top-5 answer (app.routers.predict.answer)."""
    content_type = f"multipart/form-data; boundary={boundary}"
    ranked = [(list(range(NUM_CLASSES)), [1 / NUM_CLASSES] * NUM_CLASSES)]

    async def one() -> str:
        async def chunks():
            yield body

        uploads = await read_files(content_type, str(len(body)), chunks(), field_name=FILE_FIELD,
                                   max_files=settings.max_files_per_request, max_bytes=settings.max_upload_bytes)
        imaging.decode(uploads[0].data, uploads[0].filename, loaded.preprocessing, settings.max_image_pixels)
        return answer(loaded, uploads, ranked, top_k=5).model_dump_json()

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
    predictor = Predictor(loaded, half=settings.half, channels_last=settings.channels_last, backend=backend,
                          threads=torch.get_num_threads())
    rates = {single_label: forward.images_per_second(predictor, batch_size)}
    if plan.processes:
        pool = WorkerPool(WorkerPool.config_for({loaded.name: path}, loaded.device, half=settings.half,
                                                channels_last=settings.channels_last, threads=plan.torch_threads or 1,
                                                warmup_batch_size=batch_size, nice=settings.worker_nice,
                                                backends={loaded.name: backend}),
                          plan.instances)
        pool.start()

        async def pool_rate() -> forward.Rate:  # one event loop, as in the service
            try:
                return await forward.concurrent_images_per_second_async(
                    pool.forward(loaded.name), forward.random_batch(batch_size, predictor.input_size),
                    plan.instances, 3.0)
            finally:
                await pool.close()

        rates[plan_label] = asyncio.run(pool_rate())
    else:
        plan_predictor = Predictor(loaded, half=settings.half, channels_last=settings.channels_last,
                                   backend=backend, threads=plan.torch_threads)
        rates[plan_label] = forward.images_per_second(plan_predictor, batch_size, instances=plan.instances,
                                                      threads=plan.torch_threads)
    for config, rate in rates.items():
        print(f"  {loaded.name} ({predictor.backend}): {config}: {rate.images_per_s:.0f} images/s, machine CPU "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=Settings().checkpoint_dir)
    parser.add_argument("--models", nargs="*", help="checkpoint stems (default: all served)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each run (0: none)")
    parser.add_argument("--backend-seconds", type=float, default=6.0,
                        help="seconds of the interleaved run timing every backend's bare forward")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench.json")
    args = parser.parse_args()

    harness.wrk_available()
    settings = Settings(checkpoint_dir=args.checkpoint_dir)
    paths = [p for p in checkpoint_paths(args.checkpoint_dir) if not args.models or p.stem in args.models]
    if not paths:
        raise SystemExit(f"no checkpoints to bench in {args.checkpoint_dir}")
    work = ROOT / ".bench"
    work.mkdir(exist_ok=True)
    image, filename = sample_png()
    body, boundary = harness.multipart_body(image, filename, work)
    top = max(args.concurrency)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device": str(select_device(settings.device)), "loadavg_start": loadavg()},
        "settings": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                     "duration_s": args.duration, "upload_bytes": len(image), "image": filename},
        "ceiling": {}, "models": {},
    }
    if report["machine"]["loadavg_start"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {report['machine']['loadavg_start']:.1f} before the bench; something "
              f"else is using the CPU and the numbers will be pessimistic", file=sys.stderr)

    device = select_device(settings.device)
    plan = execution_plan(settings, device)
    report["machine"]["service_plan"] = asdict(plan)
    loaded = {p.stem: load_checkpoint(p, device=device, name=p.stem) for p in paths}
    body_bytes = body.read_bytes()
    threads = plan.torch_threads or torch.get_num_threads()
    backends = {}
    for path in paths:
        handling = request_work_cpu_ms(body_bytes, boundary, loaded[path.stem], settings)
        report["models"][path.stem] = {"request_work_cpu_ms": handling}
        print(f"  {path.stem}: parsing, decoding and answering one upload in-process {handling:.2f} ms CPU",
              flush=True)
        backends[path.stem] = service_backend(loaded[path.stem], settings, threads)
        rates = backend_rates(loaded[path.stem], settings, threads, seconds=args.backend_seconds)
        report["models"][path.stem]["backend"] = backends[path.stem].to_dict()
        report["models"][path.stem]["backend_bare_forward_images_per_s"] = rates
        print(f"  {path.stem}: the service runs {backends[path.stem].label} ({backends[path.stem].reason}); "
              f"each backend's bare forward, {threads} thread(s), batch {settings.max_batch_size}, one run: " +
              ", ".join(f"{label} {rate:.0f}/s" for label, rate in rates.items()), flush=True)

    # The machine's speed drifts by up to ~25 % within minutes (a shared host), so each model's bare
    # forward is measured right before and right after its service runs, and the bound takes the
    # faster of the two: a slow spell while the forward alone ran must not make the service look good.
    rounds: dict[str, list[dict[str, forward.Rate]]] = {p.stem: [] for p in paths}
    path_of = {p.stem: p for p in paths}

    def bare_forward(name: str) -> None:
        print(f"  bare batched forward ({'before' if not rounds[name] else 'after'} the service runs):", flush=True)
        rounds[name].append(bare_forward_rates(path_of[name], loaded[name], settings, plan, backends[name]))

    def serve_and_measure(name: str, command: list[str], port: int, ready: str, urls: dict[str, str],
                          env: dict[str, str] | None = None, batched: bool = False,
                          bracket: Callable[[str], None] | None = None) -> dict:
        """`urls` maps a key (the model name, for the service) to a path; `batched`: read batch sizes;
        `bracket(key)` runs right before and right after each key's runs."""
        server = harness.start(name, command, port, ready, env=env, log_dir=work)
        results = {}
        try:
            for key, path in urls.items():
                if bracket:
                    bracket(key)
                results[key] = measure(server.url + path, args.concurrency, args.duration, args.warmup, body,
                                       boundary, server.process.pid,
                                       functools.partial(batch_totals, server.url + "/metrics", key) if batched
                                       else None)
                if bracket:
                    bracket(key)
            return results
        finally:
            server.stop()

    print("HTTP ceiling (receive-only FastAPI endpoints):", flush=True)
    port = harness.free_port()
    report["ceiling"] = serve_and_measure("receive-only", harness.uvicorn_command("bench.receive_only:app", port),
                                          port, "/healthz", {"upload": "/v1/predict", "raw_body": "/raw"})

    print("service (python -m app):", flush=True)
    port = harness.free_port()
    service = serve_and_measure(
        "service", [sys.executable, "-m", "app"], port, "/readyz",
        {p.stem: f"/v1/predict?model={p.stem}" for p in paths},
        env={"SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
             "SIGNSERVE_CHECKPOINT_DIR": str(args.checkpoint_dir)}, batched=True, bracket=bare_forward)
    for name, runs in service.items():
        report["models"][name]["service"] = runs

    print("plain per-request handler (no batching):", flush=True)
    for path in paths:
        port = harness.free_port()
        plain = serve_and_measure(f"plain-{path.stem}", harness.uvicorn_command("bench.plain_handler:create_app",
                                                                                port, factory=True),
                                  port, "/healthz", {"plain": "/v1/predict"}, env={"BENCH_CHECKPOINT": str(path)})
        report["models"][path.stem]["plain"] = plain["plain"]

    for name, model in report["models"].items():
        model["bare_forward_rounds"] = [{config: asdict(rate) for config, rate in r.items()} for r in rounds[name]]
        configs = rounds[name][0]
        model["bare_forward_images_per_s"] = {c: max(r[c].images_per_s for r in rounds[name]) for c in configs}
        model["bare_forward_machine_cpu_ms_per_image"] = {c: min(r[c].machine_cpu_ms_per_image for r in rounds[name])
                                                          for c in configs}
    report["machine"]["loadavg_end"] = loadavg()
    report["summary"] = summarize(report, top)
    print_table(report, args.concurrency, top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def summarize(report: dict, top: int) -> dict:
    """The issue's targets. `bare` is the better of the two forward configurations, so the bound is
    the strictest honest one; the ratio to the plain single-forward loop is kept alongside."""
    ceiling = report["ceiling"]["upload"][str(top)]["requests_per_s"]
    summary = {}
    for name, m in report["models"].items():
        configs = m["bare_forward_images_per_s"]
        bare, plain_loop = max(configs.values()), next(iter(configs.values()))
        service = m["service"][str(top)]["requests_per_s"]
        bound = min(bare, ceiling)
        # What the cores allow: the machine CPU a request may cost at the target throughput, next to the
        # least a signserve request can cost: reading the body; parsing it, decoding the image and
        # building the answer; the forward at its best batching.
        forward_cpu = min(m["bare_forward_machine_cpu_ms_per_image"].values())
        budget = report["machine"]["cpus"] * 1e3 / (TARGET_RATIO * bound)
        raw_cpu = report["ceiling"]["raw_body"][str(top)]["machine_cpu_ms_per_request"]
        floor = raw_cpu + m["request_work_cpu_ms"] + forward_cpu
        run = m["service"][str(top)]
        summary[name] = {
            f"service_c{top}_over_min_bare_ceiling": service / bound,
            f"service_c{top}_over_min_single_forward_loop_ceiling": service / min(plain_loop, ceiling),
            f"service_c{top}_over_plain_c{top}": service / m["plain"][str(top)]["requests_per_s"],
            "service_c1_p50_ms": m["service"]["1"]["p50_ms"] if "1" in m["service"] else None,
            "bound_requests_per_s": bound,
            "bound_is": "bare forward" if bare < ceiling else "HTTP ceiling",
            "target_cpu_budget_ms_per_request": budget,
            "raw_body_machine_cpu_ms_per_request": raw_cpu,
            "best_bare_forward_machine_cpu_ms_per_image": forward_cpu,
            "cpu_floor_ms_per_request": floor,
            "cpu_floor_limit_over_bound": report["machine"]["cpus"] * 1e3 / floor / bound,
            f"service_c{top}_machine_cpu_ms_per_request": run["machine_cpu_ms_per_request"],
            f"service_c{top}_machine_busy": run["machine_busy"],
            f"service_c{top}_mean_batch_size": run.get("mean_batch_size"),
        }
    return summary


def print_table(report: dict, concurrency: list[int], top: int) -> None:
    print("\n| model | server | backend | concurrency | requests/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = [("—", "receive-only (HTTP ceiling)", "—", report["ceiling"]["upload"]),
            ("—", "receive-only, raw body", "—", report["ceiling"]["raw_body"])]
    for name, m in report["models"].items():
        chosen = m.get("backend", {})
        rows += [(name, "signserve (batched)", f"{chosen.get('backend', 'torch')}-{chosen.get('precision', 'fp32')}",
                  m["service"]), (name, "plain handler", "torch-fp32", m["plain"])]
    for model, server, backend, runs in rows:
        for c in concurrency:
            r = runs[str(c)]
            print(f"| {model} | {server} | {backend} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} "
                  f"| {r['p95_ms']:.2f} | {r['p99_ms']:.2f} |")
    print("\n| model | backend | bare forward images/s (one interleaved run) | served |")
    print("|---|---|---:|---|")
    for name, m in report["models"].items():
        chosen = m.get("backend", {})
        for label, rate in m.get("backend_bare_forward_images_per_s", {}).items():
            served = label == f"{chosen.get('backend')}-{chosen.get('precision')}"
            print(f"| {name} | {label} | {rate:.0f} | {'yes' if served else ''} |")
    print()
    for name, m in report["models"].items():
        s = report["summary"][name]
        rounds = m["bare_forward_rounds"]
        bare = "; ".join(config + ": " + " then ".join(f"{r[config]['images_per_s']:.0f}" for r in rounds) + "/s"
                         for config in m["bare_forward_images_per_s"])
        ratio_bound = s[f"service_c{top}_over_min_bare_ceiling"]
        ratio_loop = s[f"service_c{top}_over_min_single_forward_loop_ceiling"]
        ratio_plain = s[f"service_c{top}_over_plain_c{top}"]
        print(f"{name}: bare forward right before then right after its service runs: {bare}")
        print(f"  bound = min(best bare forward, HTTP ceiling) = {s['bound_is']} {s['bound_requests_per_s']:.0f}/s")
        print(f"  service c={top} / bound = {ratio_bound:.2f}  (target >= {TARGET_RATIO:.2f}: "
              f"{'met' if ratio_bound >= TARGET_RATIO else 'NOT met'}; "
              f"against the single-forward loop: {ratio_loop:.2f})")
        print(f"  the service used {s[f'service_c{top}_machine_cpu_ms_per_request']:.2f} ms of machine CPU per "
              f"request, cores {s[f'service_c{top}_machine_busy']:.0%} busy, "
              f"{s[f'service_c{top}_mean_batch_size']:.1f} images per forward")
        reachable = s["cpu_floor_ms_per_request"] <= s["target_cpu_budget_ms_per_request"]
        print(f"  CPU budget at the target: {s['target_cpu_budget_ms_per_request']:.2f} ms of machine CPU per request. "
              f"Floor: reading the raw body {s['raw_body_machine_cpu_ms_per_request']:.2f} + parsing, decoding and "
              f"answering in-process {m['request_work_cpu_ms']:.2f} + the bare forward "
              f"{s['best_bare_forward_machine_cpu_ms_per_image']:.2f} = "
              f"{s['cpu_floor_ms_per_request']:.2f} ms, before batching and the hand-off to the forwards: the target "
              f"is {'within reach' if reachable else 'out of reach'} on this machine "
              f"(the floor alone allows {s['cpu_floor_limit_over_bound']:.2f} of the bound)")
        print(f"  service c={top} / plain c={top}      = {ratio_plain:.2f}  (target >= 2: "
              f"{'met' if ratio_plain >= 2 else 'NOT met'})")
        if s["service_c1_p50_ms"] is not None:
            print(f"  service c=1 p50 = {s['service_c1_p50_ms']:.2f} ms" +
                  ("  (target for cnn < 10 ms: " + ("met" if s["service_c1_p50_ms"] < 10 else "NOT met") + ")"
                   if name == "cnn" else ""))
    m = report["machine"]
    plan = m["service_plan"]
    print(f"\n{m['cpus']} CPUs ({m['processor']}), torch {m['torch']}, device {m['device']}; the service ran "
          f"{plan['instances']} forward instance(s) in {'processes' if plan['processes'] else 'threads'} x "
          f"{plan['torch_threads'] or m['torch_threads']} torch thread(s); "
          f"load average {m['loadavg_start']:.1f} before, {m['loadavg_end']:.1f} after")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - start:.0f} s")
