"""The forward's backends (models.backends): every installed runtime gives torch fp32's answers on real
GTSRB images, and on real GTSDB frames of any size for the detector (three outputs); the choice is cached,
and a runtime that cannot import, export, load or agree with torch falls back to torch, saying why."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from app.kinds import kind_of
from app.kinds.classifier import Predictor
from models.backends import (BACKENDS, PROBABILITY_TOLERANCE, TORCH_FP32, BackendRecord, Job, installed,
                             load_forward, output_parity, select, torch_forward)
from models.checkpoint import load_checkpoint
from models.export import QUANTIZATION_IMAGES, InputSpec, read_metadata
from models.preprocessing import Preprocessing, normalize
from models.gtsrb import default_data_root

RUNTIMES = [b for b in BACKENDS if b != "torch" and installed(b)]
GTSDB_IMAGES = Path(default_data_root()) / "gtsdb" / "images"  # beside gtsrb/


def job_for(name: str, checkpoint_snapshot, tmp_path, parity_images: int, accuracy: bool = False,
            int8: bool = False) -> tuple:
    loaded = load_checkpoint(checkpoint_snapshot / f"{name}.pt", name=name)
    job = kind_of(loaded).selection(loaded, tmp_path / "cache", batch_size=32, parity_images=parity_images).job
    job.measure_seconds = 0.3
    if not accuracy:
        job.accuracy = None
    if not int8:  # the fp32 runtimes alone (an explicit runtime serves its fastest passing variant)
        job.quantization_inputs = None
    return loaded, job


def real_batch(loaded, n: int, offset: int = 3000) -> torch.Tensor:
    """n real GTSRB test images (uint8) from past the first `offset`, as the service receives them."""
    from models.gtsrb import default_data_root, load_split

    split = load_split(default_data_root(), "test", loaded.preprocessing)
    return split.images[offset:offset + n]


@pytest.mark.parametrize("backend", RUNTIMES)
@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_each_runtime_answers_like_torch_on_real_images(name, backend, checkpoint_snapshot, tmp_path,
                                                        gtsrb_test_samples):
    loaded, job = job_for(name, checkpoint_snapshot, tmp_path, parity_images=500 if name == "cnn" else 64,
                          accuracy=name == "cnn")
    # the module the service runs: the network with its calibration (app.engine.choose_backend); fp32 asked
    # for by name, so that a CPU with bf16 runs the same check
    forward, record = select(loaded.calibrated(), job, request=f"{backend}-fp32",
                             threads=1)
    assert (record.backend, record.precision) == (backend, "fp32"), record
    figures = record.parity[record.label]
    assert figures["top1_mismatches"] == 0 and figures["max_abs_prob_diff"] <= 1e-4, figures
    assert figures["images"] == (500 if name == "cnn" else 64)
    assert set(record.images_per_s) >= {TORCH_FP32.label, record.label}
    # other real images, at batch sizes the export never saw, through the service's own Predictor
    predictor = Predictor(loaded, backend=record, threads=1)
    reference = Predictor(loaded, backend=None, threads=1)
    assert predictor.backend == record.label
    for size in (1, 7, 33):
        images = real_batch(loaded, size)
        got, want = predictor.probabilities(images), reference.probabilities(images)
        assert torch.equal(got.argmax(1), want.argmax(1))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if name == "cnn":  # the served variant's held-out accuracy, within 0.1 point of training's figure
        assert abs(record.test_accuracy[record.label] - loaded.test_accuracy) <= 0.001, record.test_accuracy
    metadata = read_metadata(record.artifact)
    assert json.loads(metadata["preprocessing"]) == loaded.preprocessing.to_dict()
    assert json.loads(metadata["class_names"]) == loaded.class_names


def frames(size: tuple[int, int], count: int, first: int = 0) -> torch.Tensor:
    """Real GTSDB street frames resized to `size` (width, height), normalised."""
    paths = sorted(Path(GTSDB_IMAGES).glob("*.jpg"))[first:first + count]
    if len(paths) < count:
        pytest.skip(f"no GTSDB frames in {GTSDB_IMAGES}")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(torch.from_numpy(np.array(image.convert("RGB").resize(size))).permute(2, 0, 1))
    return normalize(torch.stack(images), Preprocessing())


@pytest.mark.parametrize("backend", RUNTIMES)
def test_the_detector_on_whole_frames_of_any_size(backend, tmp_path):
    """The street-scene detector (fully convolutional, three outputs) exported with dynamic height and
    width, checked on real GTSDB frames of two sizes, then run at sizes it never saw, a whole
    1360x800 frame (padded to 1376x800) among them."""
    from models.detector import SignDetector, pad_to_multiple

    torch.manual_seed(0)
    module = SignDetector().eval()
    spec = InputSpec((1, 3, 192, 320), dynamic_axes=(0, 2, 3))
    parity = [frames((320, 192), 2), frames((256, 160), 1, first=2)]
    job = Job("f" * 64, spec, parity, parity[0][:1], tmp_path, parity=output_parity, measure_seconds=0.3)
    forward, record = select(module, job, request=f"{backend}-fp32", threads=1)
    assert record.label == f"{backend}-fp32", record
    assert record.parity[record.label]["max_rel_diff"] <= 1e-4
    reference = torch_forward(module, torch.device("cpu"))
    for batch in (frames((416, 256), 2, first=5), pad_to_multiple(frames((1360, 800), 1, first=9))):
        got, want = forward(batch), reference(batch)
        assert isinstance(got, tuple) and len(got) == 3
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-4 * float(w.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_the_shipped_detector_serves_on_each_runtime(backend, checkpoint_snapshot, tmp_path):
    """The service's own path: the detector kind's selection job checks parity on real validation frames, and the
    DetectorPredictor on the chosen runtime finds the same signs as torch in frames of other sizes."""
    from app.kinds.detector import DetectorPredictor
    from models.preprocessing import image_to_uint8

    loaded = load_checkpoint(checkpoint_snapshot / "detector.pt", name="detector")
    job = kind_of(loaded).selection(loaded, tmp_path / "cache", batch_size=1, parity_images=0).job
    if not job.parity_batches:
        pytest.skip(f"no GTSDB frames under {default_data_root()}")
    job.measure_seconds = 0.3
    _, record = select(loaded.model, job, request=f"{backend}-fp32", threads=1)
    assert (record.backend, record.precision) == (backend, "fp32"), record
    assert record.parity[record.label]["batches"] == 2 and record.parity[record.label]["max_rel_diff"] <= 1e-4
    served, reference = DetectorPredictor(loaded, backend=record, threads=1), DetectorPredictor(loaded, threads=1)
    assert served.backend == record.label and reference.backend == TORCH_FP32.label
    with Image.open(sorted(GTSDB_IMAGES.glob("*.jpg"))[550]) as image:
        whole = image_to_uint8(image, loaded.preprocessing).unsqueeze(0)
        small = image_to_uint8(image.resize((680, 400)), loaded.preprocessing).unsqueeze(0)
    for frame in (whole, small):
        (got,), (want,) = served.run(frame), reference.run(frame)
        assert len(got) == len(want) > 0
        for (box, score, group), (box_ref, score_ref, group_ref) in zip(got, want):
            assert group == group_ref and abs(score - score_ref) < 1e-4
            assert max(abs(a - b) for a, b in zip(box, box_ref)) < 0.01


class FlipsSmallBatches(nn.Module):
    """Branches on its input in Python: tracing exporters keep the branch the example batch took."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 43))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits if x.shape[0] > 16 else logits.flip(1)


class SpectralNet(nn.Module):
    """An FFT layer: the ONNX exporter has no rfft2 at opset 17."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x).abs().mean((2, 3)).repeat(1, 15)[:, :43]


def sign_batches(checkpoint_snapshot, sizes=(32, 8)) -> list[torch.Tensor]:
    loaded = load_checkpoint(checkpoint_snapshot / "cnn.pt")
    images = real_batch(loaded, sum(sizes), offset=0)
    batches, start = [], 0
    for size in sizes:
        batches.append(normalize(images[start:start + size], loaded.preprocessing))
        start += size
    return batches


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="onnxruntime not installed")
def test_a_runtime_that_fails_parity_falls_back_to_torch(checkpoint_snapshot, tmp_path, caplog):
    module = FlipsSmallBatches().eval()
    batches = sign_batches(checkpoint_snapshot)
    job = Job("a" * 64, InputSpec(tuple(batches[0].shape)), batches, batches[0], tmp_path, measure_seconds=0.3)
    with caplog.at_level(logging.WARNING, logger="signserve"):
        forward, record = select(module, job, request="onnxruntime", threads=1)
    assert record.label == "torch-fp32"
    assert record.rejected["onnxruntime-fp32"].startswith("parity: top-1 differs"), record.rejected
    assert record.parity["onnxruntime-fp32"]["top1_mismatches"] == 8  # the small batch, flipped by torch only
    assert "onnxruntime rejected" in caplog.text
    with torch.inference_mode():
        served, torch_answer = forward(batches[1]), module(batches[1])  # the answers served are torch's
    assert torch.equal(served.argmax(1), torch_answer.argmax(1))
    torch.testing.assert_close(served, torch_answer, atol=1e-5, rtol=1e-5)


def test_a_runtime_that_cannot_export_or_import_falls_back_to_torch(checkpoint_snapshot, tmp_path, monkeypatch):
    batches = sign_batches(checkpoint_snapshot)
    spec = InputSpec(tuple(batches[0].shape))
    if "onnxruntime" in RUNTIMES:
        job = Job("b" * 64, spec, batches, batches[0], tmp_path, measure_seconds=0.3)
        _, record = select(SpectralNet(), job, request="onnxruntime", threads=1)
        assert record.label == "torch-fp32"
        assert "UnsupportedOperatorError" in record.rejected["onnxruntime-fp32"], record.rejected
        assert "onnxruntime rejected" in record.reason
    for runtime in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, runtime, None)  # `import` now raises ImportError
        job = Job("c" * 64, spec, batches, batches[0], tmp_path, measure_seconds=0.3)
        _, record = select(FlipsSmallBatches().eval(), job, request=runtime, threads=1)
        assert record.label == "torch-fp32"
        assert record.rejected[f"{runtime}-fp32"] == f"failed: ImportError: {runtime} is not installed"


def test_without_real_images_torch_is_kept(tmp_path, caplog):
    example = torch.zeros(4, 3, 32, 32)
    job = Job("d" * 64, InputSpec((4, 3, 32, 32)), [], example, tmp_path)
    with caplog.at_level(logging.WARNING, logger="signserve"):
        _, record = select(FlipsSmallBatches().eval(), job, threads=1)
    assert record.label == "torch-fp32" and "no real images" in record.reason
    assert "no real images" in caplog.text


@pytest.mark.parametrize("name", ["cnn", "detector"])
def test_without_the_data_set_the_jobs_have_no_images(name, checkpoint_snapshot, tmp_path, monkeypatch, caplog):
    """The container image ships no GTSRB or GTSDB: choosing a backend there finds nothing to check
    parity on and keeps torch, with a warning rather than an error."""
    from app.engine import choose_backend

    monkeypatch.setenv("GTSRB_ROOT", str(tmp_path / "no-data-here"))
    loaded = load_checkpoint(checkpoint_snapshot / f"{name}.pt", name=name)
    job = kind_of(loaded).selection(loaded, tmp_path, batch_size=8, parity_images=8).job
    assert job.parity_batches == [] and job.accuracy is None
    with caplog.at_level(logging.WARNING, logger="signserve"):
        record = choose_backend(loaded, "auto", cache_dir=tmp_path, batch_size=8, parity_images=8, threads=1)
    assert record.label == "torch-fp32" and "no real images" in record.reason
    assert "check a backend on" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_record_whose_file_is_gone_loads_torch(checkpoint_snapshot, caplog):
    loaded = load_checkpoint(checkpoint_snapshot / "cnn.pt")
    record = BackendRecord("openvino", "fp32", artifact="/nonexistent/model.xml")
    with caplog.at_level(logging.WARNING, logger="signserve"):
        forward, label = load_forward(record, loaded.model, torch.device("cpu"), threads=1, name="cnn")
    assert label == "torch-fp32"
    assert "openvino-fp32 could not be loaded" in caplog.text
    batch = normalize(real_batch(loaded, 4), loaded.preprocessing)
    with torch.inference_mode():
        torch.testing.assert_close(forward(batch), loaded.model(batch))


@pytest.mark.skipif(not RUNTIMES, reason="no runtime besides torch installed")
def test_the_choice_is_cached_and_a_broken_cache_is_redone(checkpoint_snapshot, tmp_path, caplog,
                                                           gtsrb_test_samples):
    loaded, job = job_for("cnn", checkpoint_snapshot, tmp_path, parity_images=64)
    runtime = RUNTIMES[0]
    _, first = select(loaded.model, job, request=f"{runtime}-fp32", threads=1)
    assert first.label == f"{runtime}-fp32" and not first.cached
    _, second = select(loaded.model, job, request=f"{runtime}-fp32", threads=1)
    assert second.cached and second.label == first.label and second.images_per_s == first.images_per_s
    with open(first.artifact, "r+b") as f:  # a damaged export: the cached choice must not be trusted
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="signserve"):
        forward, third = select(loaded.model, job, request=f"{runtime}-fp32", threads=1)
    assert "choosing again" in caplog.text
    assert not third.cached and third.label == first.label
    batch = job.parity_batches[0]
    with torch.inference_mode():
        torch.testing.assert_close(forward(batch), loaded.model(batch), atol=1e-4, rtol=1e-4)


def test_the_service_serves_the_chosen_backend_and_shows_it(cnn_snapshot, tmp_path, sign_png, sign_image):
    """`python -m app` with SIGNSERVE_BACKEND=auto over HTTP. The first start, on an empty cache, is
    ready on torch while the choice still runs, and every answer before, during and after the swap is
    torch fp32's within the tolerance of what serves it; then the choice shows in /v1/models, the
    metrics and the log, the worker processes answer through it, and a second start reads it from
    the cache."""
    from conftest import runtimes_chosen, start_server
    from helpers import files
    from models.preprocessing import image_to_uint8

    settings = {"backend": "auto", "backend_cache_dir": tmp_path / "cache", "backend_parity_images": 64,
                "device": "cpu", "worker_processes": "true", "warmup": "false"}
    loaded = load_checkpoint(cnn_snapshot / "cnn.pt", name="cnn")
    want = Predictor(loaded, threads=1).probabilities(image_to_uint8(sign_image[0], loaded.preprocessing)[None])[0]

    def check(answer, precision: str) -> None:
        assert answer.status_code == 200, answer.text
        got = {p["class_id"]: p["probability"] for p in answer.json()["results"][0]["predictions"]}
        assert max(got, key=got.get) == int(want.argmax())
        assert max(abs(got[i] - float(want[i])) for i in got) <= PROBABILITY_TOLERANCE[precision]

    for start in ("first", "second"):
        server = start_server(cnn_snapshot, tmp_path / f"{start}.log", chosen=False, **settings)
        try:
            with server.client() as client:
                seen = []
                deadline = time.monotonic() + 600
                while True:  # until the background choice has ended
                    backend = client.get("/v1/models/cnn").json()["backend"]
                    # the answer came from torch or from the chosen runtime: within the looser of the two
                    check(client.post("/v1/predict?model=cnn&top_k=43", files=files(("sign.png", sign_png))),
                          backend["precision"] if not backend["choosing"] else "int8")
                    seen.append((f"{backend['backend']}-{backend['precision']}", backend["choosing"]))
                    if runtimes_chosen(client):
                        break
                    assert time.monotonic() < deadline, seen[-3:]
                if start == "first":
                    assert seen[0] == ("torch-fp32", True), seen  # ready before the choice ended, on torch
                info = client.get("/v1/models/cnn").json()
                backend = info["backend"]
                label = f"{backend['backend']}-{backend['precision']}"
                assert backend["cached"] == (start == "second") and not backend["choosing"]
                assert backend["running"] == [label, label], backend
                assert label in backend["images_per_s"] and "torch-fp32" in backend["images_per_s"]
                assert abs(backend["test_accuracy"][label] - info["test_accuracy"]) <= 0.001
                for tried in RUNTIMES:
                    assert f"{tried}-fp32" in backend["parity"] or f"{tried}-fp32" in backend["rejected"]
                metrics = client.get("/metrics").text
                assert (f'backend="{backend["backend"]}"' in metrics and
                        f'precision="{backend["precision"]}"' in metrics)
                answer = client.post("/v1/predict?model=cnn&top_k=43", files=files(("sign.png", sign_png)))
                # within the parity rule of what was chosen (int8 where it passed, else an fp32 runtime)
                check(answer, backend["precision"])
            log = server.log()
        finally:
            server.stop()
        assert f"cnn runs on {label}" in log and ("(cached choice)" in log) == (start == "second")
        assert ("chosen in" in log) == (start == "first")


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="openvino not installed")
@pytest.mark.parametrize("request_", ["openvino", "openvino-fp32"])
def test_the_in_process_engine_runs_the_requested_backend(request_, cnn_snapshot, tmp_path, sign_png, sign_image):
    """Forwards in threads (no worker processes): SIGNSERVE_BACKEND=openvino serves OpenVINO at whichever
    precision passed its parity rule (bf16 only on a CPU with native bf16); openvino-fp32 serves fp32 on
    every CPU. Either way the answer is torch fp32's within the served precision's tolerance."""
    from conftest import app_client
    from helpers import files
    from models.preprocessing import image_to_uint8

    with app_client(cnn_snapshot, backend=request_, backend_cache_dir=tmp_path / "cache",
                    backend_parity_images=64) as client:
        backend = client.get("/v1/models/cnn").json()["backend"]
        answer = client.post("/v1/predict?model=cnn&top_k=43", files=files(("sign.png", sign_png))).json()
    assert backend["backend"] == "openvino", backend
    precision = backend["precision"]
    assert precision == "fp32" if request_ == "openvino-fp32" else precision in ("fp32", "bf16")
    label = f"openvino-{precision}"
    parity = backend["parity"][label]
    assert parity["top1_mismatches"] == 0 and parity["tolerance"] == PROBABILITY_TOLERANCE[precision]
    loaded = load_checkpoint(cnn_snapshot / "cnn.pt")
    want = Predictor(loaded, threads=1).probabilities(image_to_uint8(sign_image[0], loaded.preprocessing)[None])[0]
    got = {p["class_id"]: p["probability"] for p in answer["results"][0]["predictions"]}
    assert max(got, key=got.get) == int(want.argmax())
    assert max(abs(got[i] - float(want[i])) for i in got) <= PROBABILITY_TOLERANCE[precision]

@pytest.mark.skipif("openvino" not in RUNTIMES, reason="openvino not installed")
def test_openvino_forwards_do_not_pin_threads(tmp_path):
    """Each worker process runs its own forward; pinned, OpenVINO puts every process's threads on the
    same first cores."""
    from models.backends import openvino_forward
    from models.export import export_openvino

    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 43)).eval()
    path = export_openvino(module, InputSpec((2, 3, 32, 32)), tmp_path / "m.xml", {})
    forward = openvino_forward(path, threads=1, precision="fp32")
    assert forward.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert forward.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(forward(x), module(x), atol=1e-5, rtol=1e-4)


def test_reduced_precision_is_tried_only_where_the_cpu_has_it():
    from models.backends import candidates

    cpu = torch.device("cpu")
    plain = [c.label for c in candidates("auto", cpu, {"avx2", "fma"})]
    assert plain == ["torch-fp32", "onnxruntime-fp32", "openvino-fp32"]
    amx = [c.label for c in candidates("auto", cpu, {"avx512f", "amx_bf16", "amx_tile"})]
    assert amx == ["torch-fp32", "torch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16"]
    assert [c.label for c in candidates("openvino", cpu, {"avx512_bf16"})] == ["torch-fp32", "openvino-fp32",
                                                                               "openvino-bf16"]
    assert [c.label for c in candidates("auto", torch.device("cuda"), set())] == ["torch-fp16"]
    with pytest.raises(ValueError, match="unknown backend"):
        candidates("tensorrt", cpu, set())


def test_a_variant_asked_for_by_name_is_tried_on_any_cpu():
    from models.backends import candidates

    cpu = torch.device("cpu")
    for flags in (set(), {"avx512_bf16"}, {"amx_bf16"}):
        assert [c.label for c in candidates("openvino-fp32", cpu, flags)] == ["torch-fp32", "openvino-fp32"]
        assert [c.label for c in candidates("openvino-bf16", cpu, flags)] == ["torch-fp32", "openvino-bf16"]
        assert [c.label for c in candidates("torch-bf16", cpu, flags)] == ["torch-fp32", "torch-bf16"]
        assert [c.label for c in candidates("torch-fp32", cpu, flags)] == ["torch-fp32"]
    assert [c.label for c in candidates("onnxruntime-int8", cpu, set())] == ["torch-fp32"]  # nothing to calibrate on
    assert [c.label for c in candidates("onnxruntime-int8", cpu, set(), int8=True)] == ["torch-fp32",
                                                                                       "onnxruntime-int8"]
    with pytest.raises(ValueError, match="unknown backend"):
        candidates("onnxruntime-bf16", cpu, {"avx512_bf16"})


def test_the_bf16_branch_forced_on_any_cpu(cnn_snapshot, tmp_path):
    """SIGNSERVE_BACKEND=torch-bf16 runs bf16 autocast whatever the CPU reports (emulated where it has no
    bf16), held to the bf16 parity rule: the path a bf16 CPU takes, exercised on every machine."""
    loaded, job = job_for("cnn", cnn_snapshot, tmp_path, parity_images=128)
    forward, record = select(loaded.calibrated(), job, request="torch-bf16",
                             threads=1)
    figures = record.parity["torch-bf16"]
    assert figures["tolerance"] == PROBABILITY_TOLERANCE["bf16"] and figures["images"] == 128
    passed = figures["top1_mismatches"] == 0 and figures["max_abs_prob_diff"] <= PROBABILITY_TOLERANCE["bf16"]
    assert record.label == ("torch-bf16" if passed else "torch-fp32"), record
    assert PROBABILITY_TOLERANCE["fp32"] < figures["max_abs_prob_diff"]  # bf16 really ran


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="openvino not installed")
def test_openvino_bf16_runs_bf16_or_says_the_cpu_has_none(tmp_path):
    """OpenVINO quietly runs f32 when asked for bf16 on a CPU without it: that variant is refused, so no
    record ever calls an fp32 forward bf16."""
    from models.backends import cpu_flags, native_bf16, openvino_forward
    from models.export import export_openvino

    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 43)).eval()
    path = export_openvino(module, InputSpec((2, 3, 32, 32)), tmp_path / "m.xml", {})
    if native_bf16(cpu_flags()):
        forward = openvino_forward(path, threads=1, precision="bf16")
        assert forward.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    else:
        with pytest.raises(RuntimeError, match="asked for bf16 and runs f32"):
            openvino_forward(path, threads=1, precision="bf16")


def test_torch_bf16_is_judged_by_the_bf16_tolerance(checkpoint_snapshot, gtsrb_test_samples):
    """bf16 autocast (emulated on a CPU without it, so only the rule is checked here, not the speed)."""
    from models.backends import classifier_parity

    loaded = load_checkpoint(checkpoint_snapshot / "cnn.pt")
    batch = normalize(real_batch(loaded, 64), loaded.preprocessing)
    reference = [torch_forward(loaded.model, torch.device("cpu"))(batch)]
    reduced = [torch_forward(loaded.model, torch.device("cpu"), "bf16")(batch)]
    strict, lenient = classifier_parity(reference, reduced, "fp32"), classifier_parity(reference, reduced, "bf16")
    diff = lenient.figures["max_abs_prob_diff"]
    assert PROBABILITY_TOLERANCE["fp32"] < diff  # bf16 really ran: it moves probabilities beyond fp32's bound
    assert not strict.ok and lenient.ok == (diff <= PROBABILITY_TOLERANCE["bf16"] and
                                            lenient.figures["top1_mismatches"] == 0)


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="onnxruntime not installed")
def test_int8_is_calibrated_on_training_images_and_held_to_the_test_split(checkpoint_snapshot, tmp_path):
    from models.backends import MAX_ACCURACY_DROP

    loaded, job = job_for("cnn", checkpoint_snapshot, tmp_path, parity_images=500, accuracy=True, int8=True)
    assert sum(len(b) for b in job.quantization_inputs()) == QUANTIZATION_IMAGES and job.int8
    forward, record = select(loaded.calibrated(), job,
                             request="onnxruntime-int8", threads=1)
    figures = record.parity["onnxruntime-int8"]
    assert figures["images"] == 500 and figures["outliers"] <= figures["outliers_allowed"] == 2, figures
    assert record.label == "onnxruntime-int8", record  # asked for by name: served whatever its speed here
    accuracy, reference = record.test_accuracy["onnxruntime-int8"], record.test_accuracy["torch-fp32"]
    assert reference == pytest.approx(loaded.test_accuracy, abs=1e-6)  # torch fp32 on the whole split
    assert reference - MAX_ACCURACY_DROP <= accuracy <= 1, record.test_accuracy
    assert read_metadata(record.artifact)["precision"].startswith("int8")
    # after the last convolution all stays fp32: the class head and the sign gate read float features
    import onnx

    graph = onnx.load(record.artifact).graph
    made_by = {output: node.op_type for node in graph.node for output in node.output}
    products = [node for node in graph.node if node.op_type in ("Gemm", "MatMul")]
    assert len(products) == 2 and not any(made_by.get(i) == "DequantizeLinear" for n in products for i in n.input)
    assert any(node.op_type == "DequantizeLinear" for node in graph.node)
    # the service's handler on other real images: the same top-1 on nearly all
    predictor, reference_predictor = Predictor(loaded, backend=record, threads=1), Predictor(loaded, threads=1)
    images = real_batch(loaded, 200)
    agree = (predictor.probabilities(images).argmax(1) ==
             reference_predictor.probabilities(images).argmax(1)).float().mean()
    assert agree >= 0.99


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="onnxruntime not installed")
def test_int8_calibrated_on_blank_images_is_not_served(checkpoint_snapshot, tmp_path):
    loaded, job = job_for("cnn", checkpoint_snapshot, tmp_path, parity_images=128, accuracy=True, int8=True)
    real = job.quantization_inputs()
    job.quantization_inputs = lambda: [torch.zeros_like(b) for b in real]  # no range to learn
    _, record = select(loaded.calibrated(), job, request="onnxruntime",
                       threads=1)
    assert record.rejected["onnxruntime-int8"].startswith("parity:"), record.rejected
    assert record.label == "onnxruntime-fp32"


def test_without_calibration_images_int8_is_not_tried():
    from models.backends import candidates

    cpu = torch.device("cpu")
    assert "onnxruntime-int8" not in [c.label for c in candidates("auto", cpu, set())]
    assert [c.label for c in candidates("onnxruntime", cpu, set(), int8=True)] == ["torch-fp32", "onnxruntime-fp32",
                                                                                   "onnxruntime-int8"]


@pytest.mark.skipif(not {"onnxruntime", "openvino"} <= set(RUNTIMES), reason="needs both runtimes")
def test_the_export_command_writes_each_format_with_its_metadata(checkpoint_snapshot, tmp_path):
    import subprocess

    from training.export import export_checkpoint

    root = Path(__file__).resolve().parent.parent
    loaded = load_checkpoint(checkpoint_snapshot / "cnn.pt")
    results = {}
    for fmt in ("onnx", "openvino"):  # the fp32 formats in this process, int8 through the command
        path, diff = export_checkpoint(checkpoint_snapshot / "cnn.pt", fmt, tmp_path)
        results[fmt] = {"path": str(path), "max_abs_logit_diff": diff}
    run = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(checkpoint_snapshot / "cnn.pt"),
                          "--format", "onnx-int8", "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results["onnx-int8"] = json.loads(run.stdout.strip().splitlines()[-1])
    assert [Path(r["path"]).name for r in results.values()] == ["cnn.onnx", "cnn.xml", "cnn-int8.onnx"]
    assert results["onnx"]["max_abs_logit_diff"] < 1e-3 and results["openvino"]["max_abs_logit_diff"] < 1e-3
    int8 = results["onnx-int8"]
    assert int8["torch_test_accuracy"] == pytest.approx(loaded.test_accuracy, abs=1e-6)
    assert int8["test_accuracy"] >= int8["torch_test_accuracy"] - 0.001, int8
    for result in results.values():
        metadata = read_metadata(result["path"])
        assert json.loads(metadata["preprocessing"]) == loaded.preprocessing.to_dict()
        assert json.loads(metadata["class_names"]) == loaded.class_names
    assert read_metadata(int8["path"])["precision"].startswith("int8")


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="onnxruntime not installed")
def test_onnxruntime_shrinks_its_arena_only_for_inputs_of_any_size(tmp_path):
    """A model taking any frame size (the detector) gives back the arena its largest batch grew after
    each run (bench.arena measures it); one of fixed size keeps the arena, which it reuses."""
    from models.backends import onnxruntime_forward
    from models.export import export_onnx

    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    any_size = export_onnx(module, InputSpec((1, 3, 32, 48), dynamic_axes=(0, 2, 3)), tmp_path / "any.onnx", {})
    fixed = export_onnx(module, InputSpec((2, 3, 32, 32)), tmp_path / "fixed.onnx", {})
    frames = onnxruntime_forward(any_size, threads=1)
    assert frames.shrinks_arena and not onnxruntime_forward(fixed, threads=1).shrinks_arena
    for shape in ((1, 3, 64, 96), (3, 3, 16, 24)):
        x = torch.randn(*shape)
        torch.testing.assert_close(frames(x), module(x), atol=1e-5, rtol=1e-4)
