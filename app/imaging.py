"""Uploaded bytes -> the model's uint8 input, refusing what is not a sane image.

Decoding happens in two steps so the caller can decide where the expensive one runs:
`open_image` reads only the header (cheap, checks format and declared size), `to_input` decodes
the pixels and applies the shared preprocessing (EXIF orientation, RGB, resize).
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from models.preprocessing import Preprocessing, image_to_uint8

# Images up to this many pixels decode in well under a millisecond: not worth a thread hop.
INLINE_DECODE_PIXELS = 256 * 256

# JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing; we let it, but only down to this
# multiple of the model input, so the final anti-aliased resize still does the real downscaling
# (GTSRB-sized images are never affected).
JPEG_DRAFT_FACTOR = 8


class ImageRejected(ValueError):
    """The upload is not an image we can classify; `status_code` is the HTTP status to answer with."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _unreadable(name: str, exc: BaseException, problem: str) -> ImageRejected:
    reason = _first_line(exc)
    if isinstance(exc, EOFError) or "truncated" in reason.lower() or "eof" in reason.lower():
        problem = "is truncated"
    return ImageRejected(422, f"image {name!r} {problem}: {reason}")


def open_image(data: bytes | bytearray, name: str, max_pixels: int) -> Image.Image:
    """Identify the image and check its declared size; the pixels are not decoded yet."""
    if not data:
        raise ImageRejected(422, f"file {name!r} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(422, f"file {name!r} is not an image in a format Pillow reads "
                                 f"(PNG, JPEG, PPM, WebP, BMP, GIF, ...)") from None
    except Image.DecompressionBombError as exc:  # beyond Pillow's own hard limit, before ours applies
        raise ImageRejected(413, f"image {name!r} is refused as a decompression bomb: {_first_line(exc)}") from None
    except Exception as exc:  # Pillow's format plugins raise many types on malformed headers
        raise _unreadable(name, exc, "has a corrupt header") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(422, f"image {name!r} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(413, f"image {name!r} declares {width}x{height} = {width * height} pixels, "
                                 f"above the limit of {max_pixels} (decompression bomb?)")
    return image


def decodes_inline(image: Image.Image) -> bool:
    return image.width * image.height <= INLINE_DECODE_PIXELS


def to_input(image: Image.Image, name: str, pre: Preprocessing) -> torch.Tensor:
    """Decode the first frame and preprocess it: uint8 [3, S, S]."""
    try:
        target = pre.input_size * JPEG_DRAFT_FACTOR
        if image.format == "JPEG" and min(image.size) >= 2 * target:
            image.draft("RGB", (target, target))
        image.load()
    except Exception as exc:
        raise _unreadable(name, exc, "could not be decoded") from None
    try:
        return image_to_uint8(image, pre)
    except Exception as exc:
        raise ImageRejected(422, f"image {name!r} ({image.mode} mode) could not be converted to RGB: "
                                 f"{_first_line(exc)}") from None
    finally:
        image.close()


def decode(data: bytes | bytearray, name: str, pre: Preprocessing, max_pixels: int) -> torch.Tensor:
    return to_input(open_image(data, name, max_pixels), name, pre)
