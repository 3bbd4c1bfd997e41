"""Small helpers shared by the API tests (imported as `helpers`: tests/ is on sys.path)."""

from __future__ import annotations

import io
import itertools
import os
import random
import socket
import struct
import zlib
from pathlib import Path

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


def forward_workers(server) -> list[int]:
    """A live server's forward worker processes: its descendants running multiprocessing's spawn_main
    (its resource tracker runs something else)."""
    from bench.harness import descendants

    pids = []
    for pid in descendants(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return sorted(pids)


# Ports for the servers tests start: 20000-32767, below Linux's ephemeral range, so no connection the
# kernel numbers itself takes one; a disjoint block per pytest-xdist worker, so two workers never hand
# out the same port between its check and the server's bind; a random start within the block, so a
# second test run on the same machine is unlikely to race this one.
_FIRST, _END = 20000, 32768
_workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_block = (_END - _FIRST) // _workers
_base = _FIRST + _block * (int(_worker) % _workers if _worker.isdigit() else 0)
_start = random.randrange(_block)
_ports = itertools.cycle([_base + (_start + i) % _block for i in range(_block)])


def free_port() -> int:
    """A loopback port that is free now and that no other test process of this run hands out."""
    for _ in range(_block):
        port = next(_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_base}-{_base + _block - 1}")
