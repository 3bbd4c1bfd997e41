"""A loaded checkpoint made ready for serving: device, precision, memory format, warm-up."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.backends import BackendRecord, Forward, Job, load_forward, output_parity, select
from models.calibration import CalibratedClassifier
from models.checkpoint import LoadedModel
from models.export import CALIBRATION_IMAGES, InputSpec, checkpoint_metadata
from models.detector import detect, frame_batch
from models.preprocessing import normalize

log = logging.getLogger("signserve")

# Per image: every class id by falling probability, those probabilities, and P(one of the signs)
Ranked = tuple[list[int], list[float], float]


def select_device(setting: str) -> torch.device:
    """`auto` -> cuda when a GPU is usable, else cpu; an explicit cuda that is missing is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SIGNSERVE_DEVICE={setting} but torch sees no CUDA device")
    return device


def served_forward(module: torch.nn.Module, loaded: LoadedModel, *, half: bool, channels_last: bool,
                   backend: BackendRecord | None, threads: int | None) -> tuple[Forward, str]:
    """The forward a handler runs `module` with, and the label of what runs: the backend record's, or
    without one torch (fp16 on CUDA when `half`)."""
    if backend is None:
        backend = BackendRecord("torch", "fp16" if half and loaded.device.type == "cuda" else "fp32")
    return load_forward(backend, module, loaded.device, threads or torch.get_num_threads(),
                        channels_last=channels_last, name=loaded.name)


class Predictor:
    """uint8 image batch [N, 3, S, S] -> calibrated class probabilities [N, C] and sign probabilities
    [N] (float32, CPU): the network wrapped with its checkpoint's calibration (CalibratedClassifier),
    so every backend runs the calibration too.

    The forward runs on the backend its record names (models.backends: torch, ONNX Runtime or
    OpenVINO, chosen at start-up by `choose_backend`); without a record, torch as below. The torch
    forward runs its own copy of the model (the checkpoint's stays as loaded, for other readers):
    NHWC (channels_last) memory format by default, which oneDNN on the CPU runs ~1.4-1.7x faster
    than NCHW for these models and cuDNN prefers too; fp16 on CUDA (tensor cores). On the CPU it
    stays fp32, so probabilities match `training.evaluate` to ~1e-6.
    """

    def __init__(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                 backend: BackendRecord | None = None, threads: int | None = None) -> None:
        self.loaded = loaded
        self.device = loaded.device
        # `backend`, after this, is the label of what really runs: the record's, or torch-fp32 if it failed to load
        self.forward, self.backend = served_forward(CalibratedClassifier(loaded.model, loaded.calibration), loaded,
                                                    half=half, channels_last=channels_last, backend=backend,
                                                    threads=threads)
        self.input_size = loaded.preprocessing.input_size

    @property
    def name(self) -> str:
        return self.loaded.name

    @torch.inference_mode()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities [N, C], sign probabilities [N])."""
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        # normalise in fp32 (0..255 minus the mean loses bits in fp16); the forward casts
        probabilities, signs = self.forward(normalize(images, self.loaded.preprocessing))
        return probabilities.float().cpu(), signs.float().cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]

    def ranked(self, images: torch.Tensor) -> list[Ranked]:
        """Per image: every class id by falling probability, the probabilities and the sign
        probability, as plain lists, so the event loop that answers the request does no tensor work."""
        probabilities, signs = self.outputs(images)
        probabilities, class_ids = probabilities.sort(dim=1, descending=True)
        return list(zip(class_ids.tolist(), probabilities.tolist(), signs.tolist()))

    run = ranked  # the handler contract every model kind answers (app.workers calls `run`)

    def warmup(self, max_batch_size: int) -> None:
        """Run every power-of-two batch size up to the maximum once, so the first requests do not pay
        for lazy initialisation (oneDNN primitives, CUDA context and kernels, allocator pools)."""
        size = 1
        while True:
            self.ranked(torch.zeros(size, 3, self.input_size, self.input_size, dtype=torch.uint8))
            if size >= max_batch_size:
                break
            size = min(size * 2, max_batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def classifier_job(loaded: LoadedModel, cache_dir: Path, batch_size: int, parity_images: int) -> Job:
    """What choosing a classifier's backend checks and times: `parity_images` real GTSRB test images
    (a class-mixed sample), the accuracy on the whole test split (an int8 candidate must stay within
    MAX_ACCURACY_DROP of torch fp32's), CALIBRATION_IMAGES training images for int8, batches of the
    service's size. Without the data set (or the training package, as in the container image) the job
    has no images, and `select` keeps torch."""
    pre = loaded.preprocessing
    spec = InputSpec((batch_size, 3, pre.input_size, pre.input_size))
    try:
        from training.data import calibration_batches, default_data_root, load_split
        from training.evaluate import forward_accuracy

        split = load_split(default_data_root(), "test", pre)
    except (FileNotFoundError, ImportError) as exc:
        log.warning("%s: no real images to check a backend on (%s)", loaded.name, exc)
        split = None
    sample = split.subset(parity_images).images if split is not None else torch.zeros(0, 3, 1, 1)
    batches = [normalize(sample[i:i + batch_size], pre) for i in range(0, len(sample), batch_size)]

    measure = batches[0] if batches else normalize(torch.zeros(spec.shape, dtype=torch.uint8), pre)
    job = Job(loaded.sha256, spec, batches, measure, Path(cache_dir), metadata=checkpoint_metadata(loaded),
              name=loaded.name)
    if split is not None:
        job.accuracy = lambda forward: round(forward_accuracy(forward, split, pre), 6)
        job.calibration = lambda: calibration_batches(default_data_root(), pre, CALIBRATION_IMAGES)
    return job


def detector_job(loaded: LoadedModel, cache_dir: Path, parity_frames: int = 2) -> Job:
    """What choosing the detector's backend checks and times: the first `parity_frames` validation
    frames of GTSDB holding signs, whole, as the service sizes them (height and width stay dynamic in
    the export: any photo's shape runs). Without the data set (or the training package, as in the
    container image) the job has no frames, and `select` keeps torch."""
    from PIL import Image

    from models.preprocessing import image_to_uint8

    pre = loaded.preprocessing
    batches: list[torch.Tensor] = []
    try:
        from training.data import default_data_root
        from training.gtsdb import read_ground_truth, split_frames

        root = default_data_root()
        frames = [f for f in split_frames(read_ground_truth(root), "val") if f.signs][:parity_frames]
        for frame in frames:
            with Image.open(Path(root) / "gtsdb" / "images" / frame.name) as image:
                batches.append(frame_batch(image_to_uint8(image, pre).unsqueeze(0), pre))
    except (FileNotFoundError, ImportError) as exc:
        log.warning("%s: no real frames to check a backend on (%s)", loaded.name, exc)
    measure = batches[0] if batches else frame_batch(torch.zeros(1, 3, 800, pre.input_size, dtype=torch.uint8), pre)
    spec = InputSpec(tuple(measure.shape), dynamic_axes=(0, 2, 3))
    # a whole frame takes ~0.1-1 s: time long enough for a few forwards of each candidate per round
    return Job(loaded.sha256, spec, batches, measure, Path(cache_dir), parity=output_parity,
               metadata=checkpoint_metadata(loaded), measure_seconds=6.0, name=loaded.name)


def choose_backend(loaded: LoadedModel, request: str, *, cache_dir: Path, batch_size: int, parity_images: int,
                   threads: int, half: bool = True) -> BackendRecord:
    """The backend record a model is served with (models.backends.select; cached per checkpoint,
    machine and thread count). `torch` skips the export, parity and timing altogether."""
    if request == "torch" or loaded.device.type == "cuda":
        precision = "fp16" if half and loaded.device.type == "cuda" else "fp32"
        reason = "SIGNSERVE_BACKEND=torch" if request == "torch" else \
            f"CUDA: torch {precision} (the CPU runtimes do not apply; TensorRT is not wired in)"
        return BackendRecord("torch", precision, reason=reason, threads=threads)
    try:
        if loaded.architecture == "detector":
            return select(loaded.model, detector_job(loaded, cache_dir), request=request, device=loaded.device,
                          threads=threads, half=half)[1]
        job = classifier_job(loaded, cache_dir, batch_size, parity_images)
        module = CalibratedClassifier(loaded.model, loaded.calibration)  # what Predictor runs
        return select(module, job, request=request, device=loaded.device, threads=threads, half=half)[1]
    except Exception as exc:  # choosing must never keep a model from being served
        reason = f"choosing a backend failed ({type(exc).__name__}: {exc}): torch fp32"
        log.error("%s: %s", loaded.name, reason)
        return BackendRecord("torch", "fp32", reason=reason, threads=threads)


# Boxes are found down to this score; the route keeps those at or above the caller's min_score.
DETECTION_FLOOR = 0.05

Found = list[tuple[tuple[float, float, float, float], float, int]]  # (box, score, group) per sign


class DetectorPredictor:
    """uint8 frames [N, 3, H, W] -> per frame, (box, score, group) of every sign by falling score,
    boxes in the frames' pixels. The detector's counterpart of `Predictor.run`: its forward runs on
    the backend its record names (torch NHWC, fp16 on CUDA, or an exported runtime with dynamic frame
    sizes), plain lists out."""

    def __init__(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                 backend: BackendRecord | None = None, threads: int | None = None) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.forward, self.backend = served_forward(loaded.model, loaded, half=half, channels_last=channels_last,
                                                    backend=backend, threads=threads)

    @property
    def name(self) -> str:
        return self.loaded.name

    def run(self, images: torch.Tensor) -> list[Found]:
        # on CUDA the uint8 frames travel and are normalised there (a quarter of the float32 bytes)
        images = images.to(self.device) if self.device.type == "cuda" else images
        found = detect(self.forward, images, self.loaded.preprocessing, min_score=DETECTION_FLOOR)
        return [[(d.box, d.score, d.group) for d in frame] for frame in found]

    def warmup(self, max_batch_size: int) -> None:
        """One frame of the benchmark's size: the first request then finds the kernels ready."""
        side = self.loaded.preprocessing.input_size
        self.run(torch.zeros(1, 3, side * 800 // 1360, side, dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_predictor(loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                   backend: BackendRecord | None = None, threads: int | None = None) -> Predictor | DetectorPredictor:
    """The handler for a checkpoint's kind, on its chosen backend: a classifier's Predictor or the
    DetectorPredictor."""
    if loaded.architecture == "detector":
        return DetectorPredictor(loaded, half=half, channels_last=channels_last, backend=backend, threads=threads)
    return Predictor(loaded, half=half, channels_last=channels_last, backend=backend, threads=threads)
