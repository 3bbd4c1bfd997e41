"""Large decodes give their memory back: the real server's resident size after several 40 Mpx images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from helpers import encode, files

MB = 1024 * 1024


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_memory_is_returned_after_large_decodes(server, sign_png):
    # a 170 kB RGBA PNG of 6320x6320 (40 Mpx, 160 MB decoded); six of them, three at a time
    bomb = encode(Image.new("RGBA", (6320, 6320), (90, 120, 30, 200)), "PNG", compress_level=9)
    with server.client(timeout=120) as client:
        assert client.post("/v1/predict", files=files(("warm.png", sign_png))).status_code == 200
        before = resident_bytes(server.process.pid)
        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(lambda i: client.post("/v1/predict", files=files((f"{i}.png", bomb)))
                                     .status_code, range(6)))
        assert statuses == [200] * 6
        held = resident_bytes(server.process.pid) - before
    # three decodes at once held 3 x 160 MB; what stays must be less than one of them (a leak of
    # the decoded images would keep several)
    one_decode = 6320 * 6320 * 4
    assert held < one_decode, f"the server holds {held / MB:.0f} MB more after the decodes"
