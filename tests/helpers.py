"""Small helpers shared by the API tests (imported as `helpers`: tests/ is on sys.path)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def files(*items: tuple[str, bytes], field: str = "file") -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx `files=` for a multipart body with one part per (filename, bytes), in order."""
    return [(field, (name, data, "application/octet-stream")) for name, data in items]


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)
