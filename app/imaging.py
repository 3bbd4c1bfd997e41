"""Uploaded bytes -> decoded images, refusing what is not a sane image or would cost too much to decode.

Decoding happens in steps so the caller can check the cost, and decide where the expensive step runs:

1. `open_image` reads only the header: the format and the declared size (refused above `max_pixels`).
2. A decoder's `reduce` asks the codec for a smaller image where the format allows it (JPEG decodes
   at 1/2, 1/4 or 1/8 scale for almost nothing); still no pixel is decoded. `decoded_pixels` then
   tells what decoding will cost in pixels' worth of memory, the figure the pixel budget counts
   (app.decoding): the pixels it materialises, and for a progressive JPEG its full-size coefficient
   arrays too (libjpeg holds them however far the image is reduced).
3. A decoder's `load` decodes, applies the EXIF orientation and produces what its model takes.

Two decoders: `InputDecoder` (a classifier's fixed-size uint8 input, the shared preprocessing of
models.preprocessing) and `SceneDecoder` (a whole photo, reduced to a long side, for a detector).
`decode_image` is the scene path in one synchronous call.
"""

from __future__ import annotations

import io
import warnings
from typing import Protocol, TypeVar

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from app.errors import Rejected
from models.preprocessing import Preprocessing, image_to_uint8, scaled_size, scene_size, to_rgb
from models.scene import Scene

# Declared width x height above which an image is refused unread: a 48-50 Mpx phone photo passes.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

# Images up to this many pixels decode in well under a millisecond: not worth a thread hop.
INLINE_DECODE_PIXELS = 256 * 256

# A classifier input is reduced on decode (JPEG draft, integer box reduction) only down to this
# multiple of its side, so the final anti-aliased resize still does the real downscaling
# (GTSRB-sized images are never affected).
JPEG_DRAFT_FACTOR = 8

T = TypeVar("T")


class ImageRejected(Rejected):
    """The upload is not an image we can decode."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _unreadable(name: str, exc: BaseException, problem: str) -> ImageRejected:
    reason = _first_line(exc)
    if isinstance(exc, EOFError) or "truncated" in reason.lower() or "eof" in reason.lower():
        problem = "is truncated"
    return ImageRejected(422, f"image {name!r} {problem}: {reason}")


def open_image(data: bytes | bytearray, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
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


# A progressive JPEG is decoded in passes over its whole coefficient arrays, which libjpeg keeps at the
# full declared size whatever the DCT scaling: 2 bytes per coefficient, one coefficient per sample of
# each component (a subsampled chroma component has fewer), against the 3 bytes of a decoded RGB pixel.
COEFFICIENT_BYTES, RGB_BYTES = 2, 3


def is_progressive(image: Image.Image) -> bool:
    """A progressive JPEG (MPO files, phone photos with extra images, are JPEGs too)."""
    return isinstance(image, JpegImageFile) and bool(image.info.get("progressive") or image.info.get("progression"))


def coefficient_samples(image: Image.Image, width: int, height: int) -> int:
    """Coefficients a JPEG of width x height holds: each component's samples, from its sampling
    factors (Pillow's `layer`: id, horizontal, vertical, quantisation table); 3 full planes if unknown."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * 3
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    return sum(-(-width * layer[1] // h_max) * -(-height * layer[2] // v_max) for layer in layers)


def decoded_pixels(image: Image.Image, declared_size: tuple[int, int] | None = None) -> int:
    """What decoding `image` costs, in RGB pixels' worth of memory: the pixels it will materialise
    (after any reduction `reduce` asked for), plus for a progressive JPEG its coefficient arrays at
    the declared size (the header's, before reduction; default: the image's size now)."""
    cost = image.width * image.height
    if is_progressive(image):
        width, height = declared_size or image.size
        cost += -(-coefficient_samples(image, width, height) * COEFFICIENT_BYTES // RGB_BYTES)
    return cost


def decodes_inline(cost: int) -> bool:
    return cost <= INLINE_DECODE_PIXELS


def draft_to(image: Image.Image, min_width: int, min_height: int) -> None:
    """Let a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least
    min_width x min_height; header-only, a no-op for other formats."""
    if isinstance(image, JpegImageFile) and image.width >= 2 * min_width and image.height >= 2 * min_height:
        image.draft("RGB", (min_width, min_height))


def _load(image: Image.Image, name: str) -> None:
    try:
        image.load()
    except Exception as exc:
        raise _unreadable(name, exc, "could not be decoded") from None


def _shrink(image: Image.Image, factor: int) -> Image.Image:
    """Integer box reduction of a decoded image (cheap, and every later step then works on the small
    image); modes Pillow cannot reduce (palette, bilevel) are returned as they are."""
    if factor < 2:
        return image
    try:
        return image.reduce(factor)
    except (ValueError, NotImplementedError):
        return image


class Decoder(Protocol[T]):
    """What a model kind needs from an upload: `reduce` (header-only) then `load` (decodes)."""

    def reduce(self, image: Image.Image) -> None: ...

    def load(self, image: Image.Image, name: str, declared_size: tuple[int, int]) -> T:
        """Decode `image` (which `reduce` saw); `declared_size` is its header's size before any reduction."""


class InputDecoder:
    """A classifier's input: uint8 [3, S, S] through the shared preprocessing (models.preprocessing)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self.keep = pre.input_size * JPEG_DRAFT_FACTOR  # reduce on decode no further than this

    def reduce(self, image: Image.Image) -> None:
        draft_to(image, self.keep, self.keep)

    def load(self, image: Image.Image, name: str, declared_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
        _load(image, name)
        try:
            small = _shrink(image, min(image.size) // self.keep)
            return image_to_uint8(small, self.pre)
        except Exception as exc:
            raise ImageRejected(422, f"image {name!r} ({image.mode} mode) could not be converted to RGB: "
                                     f"{_first_line(exc)}") from None
        finally:
            image.close()


class SceneDecoder:
    """A whole photo for a model that looks at the scene (a detector): RGB, upright, its long side
    `max_side` (None: full size; a smaller photo is enlarged toward it, models.preprocessing.scene_size).
    JPEGs are reduced while decoded (DCT scaling, no more than keeps the long side >= max_side),
    anything else after decoding, by an integer box filter then an anti-aliased bilinear resize to
    the exact size."""

    def __init__(self, max_side: int | None) -> None:
        if max_side is not None and max_side < 1:
            raise ValueError("max_side must be >= 1 or None")
        self.max_side = max_side

    def reduce(self, image: Image.Image) -> None:
        if self.max_side is not None:
            draft_to(image, *scaled_size(*image.size, self.max_side))

    def load(self, image: Image.Image, name: str, declared_size: tuple[int, int]) -> Scene:
        _load(image, name)
        rgb = None
        try:
            oriented = ImageOps.exif_transpose(image) if _needs_transpose(image) else image
            swapped = oriented.size != image.size
            original = (declared_size[1], declared_size[0]) if swapped else declared_size
            target = scene_size(*original, self.max_side)
            small = _shrink(oriented, min(oriented.width // target[0], oriented.height // target[1]))
            rgb = to_rgb(small)
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.BILINEAR)
        except Exception as exc:
            raise ImageRejected(422, f"image {name!r} ({image.mode} mode) could not be converted to RGB: "
                                     f"{_first_line(exc)}") from None
        finally:
            if rgb is not image:  # an upright RGB photo already at size is returned as it is
                image.close()
        return Scene(rgb, original)


def _needs_transpose(image: Image.Image) -> bool:
    """Whether the EXIF orientation is anything but upright (exif_transpose copies even when it is)."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1) != 1
    except Exception:  # a corrupt EXIF block: treat the image as upright
        return False


def decode_image(data: bytes | bytearray, *, max_side: int | None, name: str = "image",
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Scene:
    """Decode an uploaded photo for a model that takes the whole scene.

    Returns a models.scene.Scene: `image` (RGB, EXIF orientation applied, long side at most `max_side`;
    `max_side=None` keeps the full size) and `original_size` (the upload's upright width and height);
    its `scale` and `to_original` map `image`'s coordinates to the upload's pixels.

    A JPEG is reduced while it decodes (DCT scaling to 1/2, 1/4 or 1/8, never below `max_side`), so a
    48 Mpx phone photo costs what a ~3 Mpx one does; other formats decode at full size first.
    Raises ImageRejected: 422 for what is not a readable image, 413 for a declared size above
    `max_pixels`. This call enforces no per-request or per-process budget and runs where it is
    called (it may take a while: call it in a thread from async code); routes use
    `app.decoding.decode_uploads`, which checks the budgets first and then runs this same decoder.
    """
    decoder = SceneDecoder(max_side)
    image = open_image(data, name, max_pixels)
    declared = image.size
    decoder.reduce(image)
    return decoder.load(image, name, declared)


def to_input(image: Image.Image, name: str, pre: Preprocessing) -> torch.Tensor:
    """Decode an opened image into a classifier input: uint8 [3, S, S]."""
    decoder = InputDecoder(pre)
    declared = image.size
    decoder.reduce(image)
    return decoder.load(image, name, declared)


def decode(data: bytes | bytearray, name: str, pre: Preprocessing, max_pixels: int) -> torch.Tensor:
    return to_input(open_image(data, name, max_pixels), name, pre)
