"""The benchmark's arithmetic (bench.report.summarize) on a hand-made report: which bound applies,
the ratios the targets are about, and the CPU budget and floor printed next to them."""

import pytest

from bench.report import TARGET_RATIO, summarize


def _run(requests_per_s: float, machine_cpu_ms: float, **extra) -> dict:
    return {"requests_per_s": requests_per_s, "machine_cpu_ms_per_request": machine_cpu_ms, "machine_busy": 0.9,
            "p50_ms": 5.0, **extra}


def _report(bare_single: float, bare_plan: float, service_c32: float) -> dict:
    return {
        "machine": {"cpus": 2},
        "ceiling": {"upload": {"32": _run(2000, 0.7)}, "raw_body": {"32": _run(3000, 0.3)}},
        "models": {"cnn": {
            "bare_forward_images_per_s": {"single": bare_single, "plan": bare_plan},
            "bare_forward_machine_cpu_ms_per_image": {"single": 1.5, "plan": 1.2},
            "request_work_cpu_ms": 0.2,
            "service": {"1": _run(150, 6.0), "32": _run(service_c32, 2.5, mean_batch_size=16.0)},
            "plain": {"32": _run(150, 10.0)},
            "litserve": {"32": _run(400, 4.0)},
        }},
    }


def test_bound_is_the_faster_forward_when_it_is_below_the_ceiling():
    s = summarize(_report(bare_single=1200, bare_plan=1600, service_c32=800), top=32)["cnn"]
    assert s["bound_is"] == "bare forward" and s["bound_requests_per_s"] == 1600
    assert s["service_c32_over_min_bare_ceiling"] == pytest.approx(0.5)
    assert s["service_c32_over_min_single_forward_loop_ceiling"] == pytest.approx(800 / 1200)
    assert s["service_c32_over_plain_c32"] == pytest.approx(800 / 150)
    assert s["service_c32_over_litserve_c32"] == pytest.approx(800 / 400)


def test_bound_is_the_http_ceiling_when_the_forward_is_faster():
    s = summarize(_report(bare_single=5000, bare_plan=6000, service_c32=1500), top=32)["cnn"]
    assert s["bound_is"] == "HTTP ceiling" and s["bound_requests_per_s"] == 2000
    assert s["service_c32_over_min_bare_ceiling"] == pytest.approx(0.75)


def test_cpu_budget_and_floor():
    s = summarize(_report(bare_single=1200, bare_plan=1600, service_c32=800), top=32)["cnn"]
    # 2 cores at 0.70 x 1600 requests/s: 2000 ms / 1120 per second of CPU each
    assert s["target_cpu_budget_ms_per_request"] == pytest.approx(2000 / (TARGET_RATIO * 1600))
    # raw-body receive 0.3 + parsing, decoding and answering 0.2 + the cheaper forward configuration 1.2
    assert s["cpu_floor_ms_per_request"] == pytest.approx(1.7)
    assert s["cpu_floor_limit_over_bound"] == pytest.approx(2000 / 1.7 / 1600)


def test_the_table_names_each_backend(capsys):
    from bench.report import print_table

    report = _report(bare_single=1200, bare_plan=1600, service_c32=800)
    cnn = report["models"]["cnn"]
    cnn["service"]["1"]["p95_ms"] = cnn["service"]["1"]["p99_ms"] = 6.0
    for runs in (cnn["service"], cnn["plain"], cnn["litserve"], report["ceiling"]["upload"],
                 report["ceiling"]["raw_body"]):
        for run in runs.values():
            run.update(p95_ms=run.get("p95_ms", 6.0), p99_ms=run.get("p99_ms", 7.0), p50_ms=run["p50_ms"])
    cnn["plain"]["1"] = cnn["plain"]["32"]
    cnn["litserve"]["1"] = cnn["litserve"]["32"]
    report["ceiling"]["upload"]["1"] = report["ceiling"]["upload"]["32"]
    report["ceiling"]["raw_body"]["1"] = report["ceiling"]["raw_body"]["32"]
    cnn["backend"] = {"backend": "openvino", "precision": "fp32"}
    cnn["backend_bare_forward_images_per_s"] = {"torch-fp32": 300.0, "onnxruntime-fp32": 450.0, "openvino-fp32": 600.0}
    cnn["bare_forward_rounds"] = [{"single": {"images_per_s": 1200.0}, "plan": {"images_per_s": 1600.0}}]
    report["machine"].update(processor="x86_64", torch="2", torch_threads=2, device="cpu", loadavg_start=0.1,
                             loadavg_end=0.2, service_plan={"instances": 2, "processes": True, "torch_threads": 1})
    report["summary"] = summarize(report, top=32)
    print_table(report, [1, 32], 32)
    out = capsys.readouterr().out
    assert "| cnn | signserve (batched) | openvino-fp32 | 32 | 800 |" in out
    assert "| cnn | plain handler | torch-fp32 | 32 | 150 |" in out
    assert "| cnn | LitServe (batched) | torch-fp32 | 32 | 400 |" in out
    assert "service c=32 / LitServe c=32   = 2.00  (target >= 2.5: NOT met); LitServe c=1 p50 5.00 ms" in out
    assert "| cnn | openvino-fp32 | 600 | yes |" in out and "| cnn | torch-fp32 | 300 |  |" in out
