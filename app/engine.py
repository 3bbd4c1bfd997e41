"""A loaded checkpoint made ready for serving: device, precision, memory format, warm-up."""

from __future__ import annotations

import copy

import torch

from models.checkpoint import LoadedModel
from models.preprocessing import normalize


def select_device(setting: str) -> torch.device:
    """`auto` -> cuda when a GPU is usable, else cpu; an explicit cuda that is missing is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"SIGNSERVE_DEVICE={setting} but torch sees no CUDA device")
    return device


class Predictor:
    """uint8 image batch [N, 3, S, S] -> class probabilities [N, C] (float32, CPU).

    Runs its own copy of the model (the checkpoint's stays as loaded, for other readers):
    NHWC (channels_last) memory format by default, which oneDNN on the CPU runs ~1.4-1.7x faster
    than NCHW for these models and cuDNN prefers too; fp16 on CUDA (tensor cores). On the CPU it
    stays fp32, so probabilities match `training.evaluate` to ~1e-6.
    """

    def __init__(self, loaded: LoadedModel, *, half: bool = True, channels_last: bool = True) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.dtype = torch.float16 if half and self.device.type == "cuda" else torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(loaded.model).to(device=self.device, dtype=self.dtype,
                                                    memory_format=self.memory_format).eval()
        self.input_size = loaded.preprocessing.input_size

    @property
    def name(self) -> str:
        return self.loaded.name

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        # normalise in fp32 (0..255 minus the mean loses bits in fp16), then cast
        x = normalize(images, self.loaded.preprocessing).to(self.dtype, memory_format=self.memory_format)
        return self.model(x).float().softmax(dim=1).cpu()

    def ranked(self, images: torch.Tensor) -> list[tuple[list[int], list[float]]]:
        """Per image: every class id by falling probability, and the probabilities, as plain lists,
        so the event loop that answers the request does no tensor work."""
        probabilities, class_ids = self(images).sort(dim=1, descending=True)
        return list(zip(class_ids.tolist(), probabilities.tolist()))

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
