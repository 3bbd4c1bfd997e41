"""The bench's report: the ratios behind the targets (`summarize`) and the printed table (`print_table`)."""

from __future__ import annotations

TARGET_RATIO = 0.70  # the target: service throughput at c=32 over min(bare forward, HTTP ceiling)


def summarize(report: dict, top: int) -> dict:
    """The ratios behind the targets. `bare` is the better of the two forward configurations, so the bound is
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
            f"service_c{top}_over_litserve_c{top}": service / m["litserve"][str(top)]["requests_per_s"]
            if "litserve" in m else None,
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
        if "litserve" in m:
            rows.append((name, "LitServe (batched)", "torch-fp32", m["litserve"]))
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
        ratio_litserve = s[f"service_c{top}_over_litserve_c{top}"]
        if ratio_litserve is not None:
            p50 = m["litserve"].get("1", {}).get("p50_ms")
            print(f"  service c={top} / LitServe c={top}   = {ratio_litserve:.2f}  (target >= 2.5: "
                  f"{'met' if ratio_litserve >= 2.5 else 'NOT met'})" +
                  (f"; LitServe c=1 p50 {p50:.2f} ms" if p50 is not None else ""))
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
