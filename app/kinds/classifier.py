"""A GTSRB classifier (cnn, resnet18): one sign image in, the 43 classes ranked out."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.imaging import InputDecoder
from app.kinds.base import Handler, ModelKind, SelectionJob, ServedModel, served_forward
from models.backends import BackendRecord, Job
from models.checkpoint import LoadedModel
from models.ensemble import Ranked, ranked_answers
from models.export import QUANTIZATION_IMAGES, InputSpec, checkpoint_metadata
from models.gtsrb import quantization_batches, forward_accuracy, load_split
from models.paths import default_data_root
from models.preprocessing import normalize

log = logging.getLogger("signserve")


class Predictor:
    """uint8 image batch [N, 3, S, S] -> per image a Ranked answer (models.ensemble): the network
    wrapped with its checkpoint's calibration (CalibratedClassifier), so every backend runs the
    calibration too.

    The forward runs on the backend its record names (models.backends: torch, ONNX Runtime or
    OpenVINO); without a record, torch. The torch forward runs its own copy of the model (the
    checkpoint's stays as loaded, for other readers): NHWC (channels_last) memory format by default,
    which oneDNN on the CPU runs ~1.4-1.7x faster than NCHW for these models and cuDNN prefers too;
    fp16 on CUDA (tensor cores). On the CPU it stays fp32, so probabilities match `training.evaluate`
    to ~1e-6.
    """

    def __init__(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                 backend: BackendRecord | None = None, threads: int | None = None) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.forward, self.backend = served_forward(loaded.calibrated(), loaded, half=half,
                                                    channels_last=channels_last, backend=backend, threads=threads)
        self.input_size = loaded.preprocessing.input_size

    @torch.inference_mode()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities [N, C], sign probabilities [N]), float32 on the CPU."""
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        # normalise in fp32 (0..255 minus the mean loses bits in fp16); the forward casts
        probabilities, signs = self.forward(normalize(images, self.loaded.preprocessing))
        return probabilities.float().cpu(), signs.float().cpu()

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]

    def run(self, images: torch.Tensor) -> list[Ranked]:
        """Plain lists out, so the event loop that answers the request does no tensor work."""
        return ranked_answers(*self.outputs(images))

    def warmup(self, max_batch_size: int) -> None:
        """Every power-of-two batch size up to the maximum once (oneDNN primitives, CUDA context and
        kernels, allocator pools are set up lazily)."""
        size = 1
        while True:
            self.run(torch.zeros(size, 3, self.input_size, self.input_size, dtype=torch.uint8))
            if size >= max_batch_size:
                break
            size = min(size * 2, max_batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class ClassifierKind(ModelKind):
    classifies = True
    names_boxes = True
    trainer = "python -m training.train --model cnn|resnet18"

    def handler(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True,
                backend: BackendRecord | None = None, threads: int | None = None) -> Handler:
        return Predictor(loaded, half=half, channels_last=channels_last, backend=backend, threads=threads)

    def decoder(self, loaded: LoadedModel) -> InputDecoder:
        return InputDecoder(loaded.preprocessing)

    def selection(self, loaded: LoadedModel, cache_dir: Path, batch_size: int, parity_images: int) -> SelectionJob:
        """`parity_images` real GTSRB test images (a class-mixed sample), the accuracy on the whole
        test split (an int8 candidate must stay within MAX_ACCURACY_DROP of torch fp32's),
        QUANTIZATION_IMAGES training images to set int8 ranges, batches of the service's size. Without
        the data set (as in the container image) the job has no images, and `select` keeps torch."""
        pre = loaded.preprocessing
        spec = InputSpec((batch_size, 3, pre.input_size, pre.input_size))
        root = default_data_root()
        try:
            split = load_split(root, "test", pre)
        except FileNotFoundError as exc:
            log.warning("%s: no real images to check a backend on (%s)", loaded.name, exc)
            split = None
        sample = split.subset(parity_images).images if split is not None else torch.zeros(0, 3, 1, 1)
        batches = [normalize(sample[i:i + batch_size], pre) for i in range(0, len(sample), batch_size)]
        measure = batches[0] if batches else normalize(torch.zeros(spec.shape, dtype=torch.uint8), pre)
        job = Job(loaded.sha256, spec, batches, measure, Path(cache_dir), metadata=checkpoint_metadata(loaded),
                  name=loaded.name)
        if split is not None:
            job.accuracy = lambda forward: round(forward_accuracy(forward, split, pre), 6)
            job.quantization_inputs = lambda: quantization_batches(root, pre, QUANTIZATION_IMAGES)
        return SelectionJob(loaded.calibrated(), job)

    def default_rank(self, served: ServedModel) -> float | None:
        return served.test_accuracy or 0.0

    def describe(self, served: ServedModel) -> dict:
        return {"calibration_temperature": served.loaded.calibration.temperature}
