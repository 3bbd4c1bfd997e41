"""The forward pass of a served network, on the fastest runtime that gives torch's answers.

Candidates on the CPU: torch fp32 (channels_last; the reference), ONNX Runtime fp32, OpenVINO fp32,
and in bf16 torch autocast and OpenVINO only where the CPU reports native bf16 (avx512_bf16 or AMX):
emulated bf16 is slower than fp32 and changes the answers for nothing. ONNX Runtime int8 where the
job brings quantization images and a test split (the classifiers): it must also keep torch fp32's
held-out accuracy within MAX_ACCURACY_DROP. On CUDA: torch, fp16 when asked.

`select` exports the module once per (checkpoint sha256, input spec) into a cache directory, runs
every candidate on real inputs, rejects those whose outputs differ from torch fp32 beyond the
parity rule, measures the rest in one interleaved run and keeps the fastest. The choice is a
`BackendRecord` (JSON, cached per machine and thread count, so the next start only loads it);
`build_forward` turns a record into a forward callable in any process. A candidate that fails to
import, export, run or pass parity is rejected with the reason, and torch fp32 always remains.

A forward takes the normalised float32 batch and returns what the torch module returns (a tensor,
or a tuple of tensors), as float32 CPU tensors for the CPU runtimes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.atomic import atomic_write_text
from models.export import QUANTIZATION_VERSION, InputSpec, export_onnx, export_openvino, quantize_onnx

log = logging.getLogger("signserve")

BACKENDS = ("torch", "onnxruntime", "openvino")
# Each runtime's precisions on the CPU (torch fp16 is CUDA's).
PRECISIONS = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16")}
# A plain runtime name asks for its fastest variant that passes parity (bf16 only on a CPU with native
# bf16); `runtime-precision` asks for exactly that variant, on any CPU (bf16 is then emulated where
# the CPU has none: slower, but the same parity rule), torch fp32 when it fails.
REQUESTS = ("auto", *BACKENDS, *(f"{b}-{p}" for b, ps in PRECISIONS.items() for p in ps))
# 2: parity covers the sign probability; int8 candidates. 3: int8 recipe 2. 4: the artifact's digest,
# its path relative to the record
RECORD_VERSION = 4
# A runtime other than torch must beat torch fp32 by this factor to be chosen: within the noise of one
# measurement, the reference runtime wins.
MIN_SPEEDUP = 1.05

Output = torch.Tensor | tuple[torch.Tensor, ...]
Forward = Callable[[torch.Tensor], Output]


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch | onnxruntime | openvino
    precision: str  # fp32 | bf16 | fp16

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.precision}"


TORCH_FP32 = Candidate("torch", "fp32")


@dataclass
class BackendRecord:
    """What runs a model's forward, and the evidence for the choice."""

    backend: str
    precision: str
    artifact: str | None = None  # the exported file it runs (None for torch)
    artifact_sha256: str | None = None  # its digest when it was chosen: nothing else is ever loaded
    reason: str = ""  # why this candidate: fastest passing parity, or why it fell back
    threads: int = 1  # intra-op threads per forward the choice was measured with
    images_per_s: dict[str, float] = field(default_factory=dict)  # candidate label -> bare forward, one run
    parity: dict[str, dict] = field(default_factory=dict)  # candidate label -> figures against torch fp32
    rejected: dict[str, str] = field(default_factory=dict)  # candidate label -> why
    test_accuracy: dict[str, float] = field(default_factory=dict)  # the served variant's, when the job measures it
    context: dict = field(default_factory=dict)  # machine, versions, spec: what the record is valid for
    selected_in_s: float = 0.0
    cached: bool = False  # loaded from the cache rather than measured in this process

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.precision}"

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.backend, self.precision)

    @classmethod
    def for_artifact(cls, backend: str, precision: str, artifact: str | None) -> "BackendRecord":
        """A record for a forward that runs `artifact` as it is on disk now (its digest taken here)."""
        return cls(backend, precision, artifact, artifact_digest(artifact) if artifact else None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackendRecord":
        return cls(**d)


@dataclass(frozen=True)
class Parity:
    ok: bool
    figures: dict  # e.g. {"images": 500, "top1_mismatches": 0, "max_abs_prob_diff": 2e-6}
    reason: str = ""


# Parity rules: (reference outputs, candidate outputs, candidate precision) -> Parity. The outputs are
# lists of per-batch module outputs, reference from torch fp32 on the same inputs.
ParityRule = Callable[[list[Output], list[Output], str], Parity]

# Largest difference in any probability (each class's, and the sign gate's) a candidate may show against
# torch fp32: fp32 runtimes differ by summation order only (~1e-6 measured), bf16 keeps 8 bits of
# mantissa, int8 rounds the activations up to the last convolution to one of 256 levels.
PROBABILITY_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2, "int8": 0.1}
# Share of the images on which a candidate may still differ (another top-1, or a probability beyond
# the tolerance): none at full or half precision. int8 moves a few borderline images (3 of the 4,001
# test images changed top-1 for each shipped classifier); MAX_ACCURACY_DROP bounds what that costs.
OUTLIER_SHARE = {"int8": 0.004}
# A quantised candidate is served only if its accuracy on the whole test split is at most this far
# below torch fp32's on the same images.
MAX_ACCURACY_DROP = 0.001
# The same for raw outputs (any network): max |difference| over max |reference|, per output tensor.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}


def _as_tuple(out: Output) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _probabilities(out: Output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class probabilities [N, C], sign probabilities [N] or None) of a classifier's output: the
    served CalibratedClassifier's pair as it is, plain logits through softmax."""
    if isinstance(out, torch.Tensor):
        return out.float().softmax(1), None
    return out[0].float(), out[1].float()


def classifier_parity(reference: list[Output], candidate: list[Output], precision: str) -> Parity:
    """Classifier outputs (logits, or the served pair of calibrated class probabilities and sign
    probabilities): the same top-1, and every probability within PROBABILITY_TOLERANCE, on all images
    but OUTLIER_SHARE of them."""
    ref_pairs, got_pairs = [_probabilities(o) for o in reference], [_probabilities(o) for o in candidate]
    ref, got = torch.cat([p for p, _ in ref_pairs]), torch.cat([p for p, _ in got_pairs])
    differs = ref.argmax(1) != got.argmax(1)
    diff = (ref - got).abs().amax(1)
    if ref_pairs and ref_pairs[0][1] is not None:
        diff = torch.maximum(diff, (torch.cat([s for _, s in ref_pairs]) - torch.cat([s for _, s in got_pairs])).abs())
    tolerance = PROBABILITY_TOLERANCE[precision]
    outliers = differs | ~(diff <= tolerance)  # a NaN counts as beyond
    allowed = math.ceil(OUTLIER_SHARE.get(precision, 0.0) * len(ref) - 1e-9)  # one batch of 32 may hold one
    mismatches, worst = int(differs.sum()), float(diff.max()) if len(ref) else 0.0
    figures = {"images": len(ref), "top1_mismatches": mismatches, "max_abs_prob_diff": worst,
               "tolerance": tolerance, "outliers": int(outliers.sum()), "outliers_allowed": allowed}
    if mismatches > allowed:
        return Parity(False, figures, f"top-1 differs from torch fp32 on {mismatches} of {len(ref)} images"
                                      + (f" (at most {allowed} allowed)" if allowed else ""))
    if int(outliers.sum()) > allowed:
        return Parity(False, figures, f"a probability differs from torch fp32 by {worst:.2e} > {tolerance:.0e}"
                                      + (f" on {int(outliers.sum())} images (at most {allowed})" if allowed else ""))
    return Parity(True, figures)


def output_parity(reference: list[Output], candidate: list[Output], precision: str) -> Parity:
    """Any outputs: each tensor within RELATIVE_TOLERANCE of torch fp32's, relative to its largest value."""
    tolerance = RELATIVE_TOLERANCE[precision]
    worst = 0.0
    for ref_out, got_out in zip(reference, candidate):
        ref_t, got_t = _as_tuple(ref_out), _as_tuple(got_out)
        if len(ref_t) != len(got_t) or any(r.shape != g.shape for r, g in zip(ref_t, got_t)):
            return Parity(False, {}, "outputs differ in number or shape from torch fp32's")
        for r, g in zip(ref_t, got_t):
            scale = float(r.float().abs().max()) or 1.0
            worst = max(worst, float((r.float() - g.float()).abs().max()) / scale)
    figures = {"batches": len(reference), "max_rel_diff": worst, "tolerance": tolerance}
    if not worst <= tolerance:
        return Parity(False, figures, f"outputs differ from torch fp32 by {worst:.2e} of their range > {tolerance:.0e}")
    return Parity(True, figures)


# --- what the machine offers -------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(flags: set[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def installed(backend: str) -> str | None:
    """The runtime's version, or None when it cannot be imported."""
    try:
        if backend == "torch":
            return torch.__version__
        if backend == "onnxruntime":
            import onnx  # noqa: F401  (the exporter writes through it)
            import onnxruntime

            return onnxruntime.__version__
        if backend == "openvino":
            import openvino

            return openvino.__version__
    except Exception:  # ImportError, or a broken install raising anything at import
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def candidates(request: str, device: torch.device, flags: set[str], half: bool = True,
               int8: bool = False) -> list[Candidate]:
    """What `select` tries for SIGNSERVE_BACKEND=`request`, reference first. `int8`: the job can
    calibrate a quantised model and check its held-out accuracy (ONNX Runtime's static quantisation)."""
    if request not in REQUESTS:
        raise ValueError(f"unknown backend {request!r}; expected one of {', '.join(REQUESTS)}")
    if device.type == "cuda":
        return [Candidate("torch", "fp16" if half else "fp32")]
    found = [TORCH_FP32]
    backend, _, precision = request.partition("-")
    if precision:  # one variant named exactly
        wanted = Candidate(backend, precision)
        return found + ([wanted] if wanted != TORCH_FP32 and (precision != "int8" or int8) else [])
    bf16 = native_bf16(flags)
    for backend in BACKENDS:
        if request in ("auto", backend):
            # ONNX Runtime's CPU provider has no bf16 switch for an fp32 graph
            precisions = ["fp32", "bf16"] if bf16 and backend != "onnxruntime" else ["fp32"]
            if int8 and backend == "onnxruntime":
                precisions.append("int8")
            found += [Candidate(backend, p) for p in precisions if Candidate(backend, p) != TORCH_FP32]
    return found


# --- forwards -------------------------------------------------------------------------------------

class _Threads:
    """torch's intra-op thread count set for a block, restored after."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.previous = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.previous)


def torch_forward(module: nn.Module, device: torch.device, precision: str = "fp32",
                  channels_last: bool = True) -> Forward:
    """The module itself: NHWC on the CPU and CUDA (oneDNN and cuDNN prefer it), fp16 weights on CUDA,
    bf16 by autocast on the CPU (weights stay fp32, so accumulation and the head stay exact)."""
    import copy

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = copy.deepcopy(module).to(device=device, dtype=dtype, memory_format=memory_format).eval()
    autocast = precision == "bf16"

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> Output:
        x = x.to(device, dtype, memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()

    return forward


def _from_numpy(outputs: Sequence, names: list[str]) -> Output:
    """Runtime outputs as the torch module returns them: one tensor when the export named its single
    output `output` (models.export.output_names), else a tuple."""
    tensors = tuple(torch.from_numpy(o) if o.dtype.name == "float32" else torch.from_numpy(o).float()
                    for o in outputs)
    return tensors[0] if names == ["output"] else tensors


def onnxruntime_forward(path: str | os.PathLike, threads: int) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    # With any frame size (the detector's dynamic height and width) the arena grows to the largest
    # batch ever run and keeps it (~0.5 GB more after a few large batches); shrinking it after each run
    # gives that back at no measured cost, where switching the arena off slows each run by half
    # (python -m bench.arena).
    run_options = None
    if any(not isinstance(d, int) for d in session.get_inputs()[0].shape[2:]):
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def forward(x: torch.Tensor) -> Output:
        return _from_numpy(session.run(None, {name: x.detach().contiguous().cpu().numpy()}, run_options), names)

    forward.shrinks_arena = run_options is not None  # for inspection
    return forward


def openvino_forward(path: str | os.PathLike, threads: int, precision: str) -> Forward:
    import openvino as ov

    # No CPU pinning: the service runs one forward per worker process, and OpenVINO pins each process's
    # threads to the same first cores (two 1-thread resnet18 workers: 98 images/s pinned, 150 not).
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    runs = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"
    if (runs == "bf16") != (precision == "bf16"):  # OpenVINO quietly runs f32 where the CPU has no bf16
        raise RuntimeError(f"OpenVINO was asked for {precision} and runs {runs} on this CPU")
    names = [o.get_any_name() for o in compiled.outputs]
    local = threading.local()  # an infer request serves one inference at a time: one per calling thread

    def forward(x: torch.Tensor) -> Output:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        result = local.request.infer(x.detach().contiguous().cpu().numpy())
        return _from_numpy([result[o] for o in compiled.outputs], names)

    forward.compiled = compiled  # for inspection (its properties)
    return forward


def artifact_digest(path: str | os.PathLike) -> str:
    """sha256 of an exported model: the file, and for OpenVINO's .xml the .bin of weights beside it."""
    h = hashlib.sha256()
    files = [Path(path)] + ([Path(path).with_suffix(".bin")] if Path(path).suffix == ".xml" else [])
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build_forward(record: BackendRecord, module: nn.Module, device: torch.device, threads: int,
                  channels_last: bool = True) -> Forward:
    """The forward a record describes. Raises when the runtime or the artifact is unusable, and when
    the artifact is not byte for byte the file that passed parity when the record was made (changed
    on disk, truncated, replaced); `load_forward` is the variant that falls back instead."""
    backend, precision = record.backend, record.precision
    if backend == "torch":
        return torch_forward(module, device, precision, channels_last)
    artifact = record.artifact
    if not artifact or not Path(artifact).is_file():
        raise FileNotFoundError(f"{backend} model file {artifact} is missing")
    if record.artifact_sha256 is None or artifact_digest(artifact) != record.artifact_sha256:
        raise ValueError(f"{backend} model file {artifact} is not the file chosen (its sha256 differs from "
                         "the one recorded when it passed parity)")
    if backend == "onnxruntime":
        return onnxruntime_forward(artifact, threads)
    if backend == "openvino":
        return openvino_forward(artifact, threads, precision)
    raise ValueError(f"unknown backend {backend!r}")


def load_forward(record: BackendRecord, module: nn.Module, device: torch.device, threads: int,
                 channels_last: bool = True, name: str = "model") -> tuple[Forward, str]:
    """`build_forward`, or torch fp32 with a log line when that fails. Returns (forward, label run)."""
    try:
        return build_forward(record, module, device, threads, channels_last), record.label
    except Exception as exc:
        log.warning("%s: %s could not be loaded (%s: %s); running torch fp32", name, record.label,
                    type(exc).__name__, exc)
        return torch_forward(module, device, "fp32", channels_last), TORCH_FP32.label


# --- measuring ------------------------------------------------------------------------------------

def images_per_second(forwards: dict[str, Forward], batch: torch.Tensor, seconds: float, threads: int,
                      rounds: int = 3) -> dict[str, float]:
    """Every forward on `batch`, back to back, interleaved in `rounds` so a slow spell of a shared
    machine hits them all alike; each keeps its best round (images/s)."""
    best = {label: 0.0 for label in forwards}
    with _Threads(threads):
        for forward in forwards.values():
            forward(batch)  # warm-up: lazy initialisation, allocator pools
        for _ in range(rounds):
            for label, forward in forwards.items():
                count, started = 0, time.perf_counter()
                while True:
                    forward(batch)
                    count += len(batch)
                    elapsed = time.perf_counter() - started
                    if elapsed >= seconds / rounds:
                        break
                best[label] = max(best[label], count / elapsed)
    return best


# --- selection and its cache ----------------------------------------------------------------------

@dataclass
class Job:
    """What `select` needs besides the module: where it may write, what it checks on, what it times."""

    sha256: str  # of the checkpoint: exports are cached under it
    spec: InputSpec
    parity_batches: list[torch.Tensor]  # real inputs, normalised, as the forward gets them
    measure_batch: torch.Tensor  # the batch the candidates are timed on
    cache_dir: Path
    parity: ParityRule = classifier_parity
    metadata: dict[str, str] = field(default_factory=dict)  # written into the exported files
    accuracy: Callable[[Forward], float] | None = None  # held-out accuracy of the chosen forward, recorded
    # real training inputs (normalised batches) that set a quantised model's activation ranges, made
    # only when an int8 file has to be written; None: no int8 candidate
    quantization_inputs: Callable[[], list[torch.Tensor]] | None = None
    measure_seconds: float = 1.5
    name: str = "model"

    @property
    def int8(self) -> bool:
        """Whether an int8 candidate can be made (quantization inputs) and held to the accuracy rule."""
        return self.quantization_inputs is not None and self.accuracy is not None


def _context(job: Job, request: str, device: torch.device, threads: int, flags: set[str]) -> dict:
    """What a cached choice depends on: a different CPU, thread count, runtime or request chooses again."""
    return {"record_version": RECORD_VERSION, "request": request, "device": str(device), "threads": threads,
            "cpu": cpu_name(), "bf16": native_bf16(flags), "int8": job.int8, "spec": job.spec.to_dict(),
            "measure_shape": list(job.measure_batch.shape),
            "versions": {b: installed(b) for b in BACKENDS}}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def export_dir(cache_dir: Path, sha256: str, spec: InputSpec) -> Path:
    return Path(cache_dir) / f"{sha256[:16]}-{spec.key()}"


def export_candidate(candidate: Candidate, module: nn.Module, job: Job) -> str:
    """The candidate's exported file, from the cache or written now."""
    folder = export_dir(job.cache_dir, job.sha256, job.spec)
    if candidate.backend == "onnxruntime":
        path = folder / "model.onnx"
        if not path.is_file():
            export_onnx(module, job.spec, path, job.metadata)
        if candidate.precision == "int8":
            source, path = path, folder / f"model-int8-v{QUANTIZATION_VERSION}.onnx"
            if not path.is_file():
                quantize_onnx(source, path, job.quantization_inputs(), job.metadata)
    else:
        path = folder / "openvino" / "model.xml"
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            export_openvino(module, job.spec, path, job.metadata)
    return str(path)


def _run_all(forward: Forward, batches: list[torch.Tensor], threads: int) -> list[Output]:
    with _Threads(threads), torch.inference_mode():
        return [forward(b) for b in batches]


def _candidate_forward(candidate: Candidate, module: nn.Module, job: Job, device: torch.device,
                       threads: int) -> tuple[Forward, BackendRecord]:
    if installed(candidate.backend) is None:
        raise ImportError(f"{candidate.backend} is not installed")
    artifact = None if candidate.backend == "torch" else export_candidate(candidate, module, job)
    record = BackendRecord.for_artifact(candidate.backend, candidate.precision, artifact)
    return build_forward(record, module, device, threads), record


def select(module: nn.Module, job: Job, *, request: str = "auto", device: torch.device = torch.device("cpu"),
           threads: int = 1, half: bool = True) -> tuple[Forward, BackendRecord]:
    """The forward to serve `module` with, and the record of why. Cached: a second call with the same
    checkpoint, machine, threads and runtimes loads the recorded choice without exporting or measuring."""
    flags = cpu_flags()
    context = _context(job, request, device, threads, flags)
    record_path = export_dir(job.cache_dir, job.sha256, job.spec) / f"choice-{_digest(context)}.json"
    cached = _load_cached(record_path, module, job, device, threads)
    if cached is not None:
        return cached
    started = time.perf_counter()
    forward, record = _select_now(module, job, request, device, threads, half, flags)
    record.context = context
    record.selected_in_s = round(time.perf_counter() - started, 2)
    if device.type == "cpu":  # a CUDA choice is not measured, nothing to keep
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            saved = record.to_dict()
            if record.artifact:  # relative to the record: a copied or moved cache still holds its files
                saved["artifact"] = Path(record.artifact).relative_to(record_path.parent).as_posix()
            atomic_write_text(json.dumps(saved, indent=2) + "\n", record_path)
        except OSError as exc:
            log.warning("%s: the backend choice is not cached (%s); the next start chooses again", job.name, exc)
    return forward, record


def _load_cached(path: Path, module: nn.Module, job: Job, device: torch.device,
                 threads: int) -> tuple[Forward, BackendRecord] | None:
    """The recorded choice, rebuilt and re-checked on one parity batch; None (choose again) when the
    record is absent, unreadable, or its forward no longer loads or agrees with torch."""
    if not path.is_file():
        return None
    try:
        record = BackendRecord.from_dict(json.loads(path.read_text()))
        if record.artifact:
            folder = path.parent.resolve()
            artifact = (folder / record.artifact).resolve()
            if Path(record.artifact).is_absolute() or not artifact.is_relative_to(folder):
                raise ValueError(f"its model file {record.artifact} is outside the cache folder {folder}")
            record.artifact = str(artifact)
        forward = build_forward(record, module, device, threads)
        if record.backend != "torch" and job.parity_batches:
            batch = job.parity_batches[:1]
            reference = _run_all(torch_forward(module, device), batch, threads)
            check = job.parity(reference, _run_all(forward, batch, threads), record.precision)
            if not check.ok:
                raise ValueError(f"parity no longer holds: {check.reason}")
    except Exception as exc:
        log.warning("%s: cached backend choice %s unusable (%s: %s); choosing again", job.name, path.name,
                    type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        shutil.rmtree(export_dir(job.cache_dir, job.sha256, job.spec), ignore_errors=True)
        return None
    record.cached = True
    return forward, record


def _fastest(passing: dict[str, tuple[Candidate, Forward, BackendRecord]], rates: dict[str, float], request: str,
             record: BackendRecord) -> str:
    """The label to serve among the passing candidates: for `auto` the fastest, if it beats torch fp32
    by MIN_SPEEDUP; for an explicit runtime its fastest passing variant, however fast; else torch fp32."""
    torch_rate = rates[TORCH_FP32.label]
    if request in ("auto", "torch"):
        best = max(passing, key=rates.get)
        if best != TORCH_FP32.label and rates[best] < MIN_SPEEDUP * torch_rate:
            record.rejected[best] = (f"less than {MIN_SPEEDUP}x torch fp32 ({rates[best]:.3g} against "
                                     f"{torch_rate:.3g} images/s)")
            best = TORCH_FP32.label
        return best
    asked = [label for label, (c, _, _) in passing.items() if request in (c.backend, c.label)]
    return max(asked, key=rates.get) if asked else TORCH_FP32.label


def _select_now(module: nn.Module, job: Job, request: str, device: torch.device, threads: int, half: bool,
                flags: set[str]) -> tuple[Forward, BackendRecord]:
    tried = candidates(request, device, flags, half, int8=job.int8)
    if device.type == "cuda":
        reason = "CUDA: torch" + (" fp16" if half else "") + " (TensorRT is not wired in)"
        return torch_forward(module, device, tried[0].precision), BackendRecord("torch", tried[0].precision,
                                                                                  reason=reason, threads=threads)
    record = BackendRecord("torch", "fp32", threads=threads)
    if not job.parity_batches:
        record.reason = "no real images to check parity on: torch fp32"
        log.warning("%s: %s", job.name, record.reason)
        return torch_forward(module, device), record
    if not native_bf16(flags) and "-" not in request:
        record.rejected["*-bf16"] = "not tried: the CPU reports no native bf16 (avx512_bf16 / amx_bf16)"
    if not job.int8 and request in ("auto", "onnxruntime", "onnxruntime-int8"):
        record.rejected["onnxruntime-int8"] = "not tried: no quantization images and held-out accuracy to hold it to"
    reference = _run_all(torch_forward(module, device), job.parity_batches, threads)
    passing: dict[str, tuple[Candidate, Forward, BackendRecord]] = {}
    for candidate in tried:
        try:
            forward, built = _candidate_forward(candidate, module, job, device, threads)
            if candidate == TORCH_FP32:
                passing[candidate.label] = (candidate, forward, built)
                continue
            parity = job.parity(reference, _run_all(forward, job.parity_batches, threads), candidate.precision)
        except Exception as exc:
            record.rejected[candidate.label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            continue
        record.parity[candidate.label] = parity.figures
        if parity.ok:
            passing[candidate.label] = (candidate, forward, built)
        else:
            record.rejected[candidate.label] = f"parity: {parity.reason}"
    record.images_per_s = {label: round(rate, 1) for label, rate in images_per_second(
        {label: forward for label, (_, forward, _) in passing.items()}, job.measure_batch, job.measure_seconds,
        threads).items()}
    rates = record.images_per_s
    while True:
        best = _fastest(passing, rates, request, record)
        candidate, forward, built = passing[best]
        if candidate.precision != "int8":
            break
        # int8 may move a few borderline images: it is served only if the whole test split says so
        with _Threads(threads):
            if TORCH_FP32.label not in record.test_accuracy:
                record.test_accuracy[TORCH_FP32.label] = job.accuracy(passing[TORCH_FP32.label][1])
            accuracy = record.test_accuracy[best] = job.accuracy(forward)
        reference = record.test_accuracy[TORCH_FP32.label]
        if accuracy >= reference - MAX_ACCURACY_DROP:
            break
        record.rejected[best] = (f"test accuracy {accuracy:.4f}, more than {MAX_ACCURACY_DROP} under torch fp32's "
                                 f"{reference:.4f}")
        del passing[best]
    for label in passing:
        if label != best and label not in record.rejected:
            record.rejected[label] = f"slower ({rates[label]:.3g} images/s against {rates[best]:.3g})"
    record.backend, record.precision = candidate.backend, candidate.precision
    record.artifact, record.artifact_sha256 = built.artifact, built.artifact_sha256
    torch_rate = rates[TORCH_FP32.label]
    if best != TORCH_FP32.label:
        record.reason = (f"{'fastest' if request == 'auto' else 'requested, and'} passing parity: "
                         f"{rates[best]:.3g} images/s, {rates[best] / torch_rate:.2f}x torch fp32 in the same run")
    elif request in ("auto", "torch", TORCH_FP32.label):
        record.reason = "torch fp32: no other candidate passed parity and was faster"
    else:
        why = "; ".join(f"{k}: {v}" for k, v in record.rejected.items() if k.startswith(request)) or "not tried"
        record.reason = f"{request} rejected ({why}): torch fp32 instead"
        log.warning("%s: %s", job.name, record.reason)
    if job.accuracy is not None and best not in record.test_accuracy:
        with _Threads(threads):
            record.test_accuracy[best] = job.accuracy(forward)
    return forward, record
