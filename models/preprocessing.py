"""The one preprocessing: image -> fixed-size uint8 tensor -> normalised float batch.

Training (dataset cache, evaluation) and serving both call these two functions, and every checkpoint
stores its `Preprocessing` so a served model sees its inputs exactly as it saw them in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from models.input_sizes import DEFAULT_INPUT_SIZE

# Per-channel statistics of the GTSRB training images after resizing to 32x32, in [0, 1] units
# (measured with `python -m models.gtsrb --stats`). Close enough for any input size.
GTSRB_MEAN: tuple[float, float, float] = (0.3433, 0.3151, 0.3253)
GTSRB_STD: tuple[float, float, float] = (0.2759, 0.2646, 0.2706)


@dataclass(frozen=True)
class Preprocessing:
    input_size: int = DEFAULT_INPUT_SIZE["cnn"]
    mean: tuple[float, float, float] = GTSRB_MEAN
    std: tuple[float, float, float] = GTSRB_STD
    interpolation: str = "bilinear"  # PIL resample filter used to reach input_size x input_size
    # Optionally histogram-equalise the luminance after resizing (a classic GTSRB trick for photos
    # taken at dusk or against glare). Off by default: with our CNN it measured worse (see README).
    equalize: bool = False
    # "square": resize to input_size x input_size (the classifiers' crops); "fit": shrink, keeping the
    # aspect ratio, until the longer side is at most input_size, never enlarge (the detector's frames).
    resize: str = "square"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d["interpolation"]),
            equalize=bool(d.get("equalize", False)),  # absent in checkpoints written before the option
            resize=str(d.get("resize", "square")),
        )

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is resized to."""
        if self.resize == "square":
            return self.input_size, self.input_size
        return scaled_size(width, height, self.input_size)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
INTERPOLATIONS = frozenset(_RESAMPLE)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (the same image when it already is)."""
    if image.mode == "P":
        image = image.convert("RGBA")  # palette images may carry transparency; go through RGBA
    return image if image.mode == "RGB" else image.convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, RGB: the image whose pixel coordinates the answers use."""
    return to_rgb(ImageOps.exif_transpose(image))


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the long side is at most `max_side`, aspect ratio kept (never enlarged)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    ratio = max_side / max(width, height)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


# A photo smaller than the detector's input is enlarged toward it by at most this factor: its signs
# then span the pixels the detector learned them at (a 680x400 photo's 10 px sign becomes 20 px).
MAX_ENLARGEMENT = 2.0


def scene_size(width: int, height: int, max_side: int | None,
               max_enlargement: float = MAX_ENLARGEMENT) -> tuple[int, int]:
    """(width, height) a detector looks at: a larger photo reduced so its long side is `max_side`, a
    smaller one enlarged toward it (at most `max_enlargement` times), the aspect ratio kept."""
    if max_side is None or max(width, height) >= max_side:
        return scaled_size(width, height, max_side)
    ratio = min(max_enlargement, max_side / max(width, height))
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def image_to_uint8(image: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """A PIL image in any mode -> uint8 tensor [3, H, W]: EXIF orientation applied, RGB, resized
    (H = W = input_size for "square", the aspect kept for "fit")."""
    image = upright_rgb(image)
    size = pre.target_size(*image.size)
    if size != image.size:
        image = image.resize(size, _RESAMPLE[pre.interpolation])
    if pre.equalize:
        y, cb, cr = image.convert("YCbCr").split()
        image = Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB")
    # HWC -> CHW in numpy: one copy, and about half the CPU of torch's permute + contiguous on one
    # small image (this runs on the service's event loop for every upload)
    return torch.from_numpy(np.array(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), order="C"))


def normalize(batch: torch.Tensor, pre: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, S, S] (any device) -> normalised float [N, 3, S, S] on the same device."""
    mean = torch.tensor(pre.mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=batch.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (batch.to(dtype) - mean) / std
