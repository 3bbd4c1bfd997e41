"""The multipart reader accepts the same bodies, returns the same files and refuses the same way
whatever the body's size and however it arrives (whole with its length, or in chunks without)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.uploads import Upload, UploadRejected, read_files

LARGE_BODY_BYTES = 256 * 1024  # bodies this large were once read by another parser than small ones

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, data: bytes, filename: str | None = "x.png", content_type: str = "image/png",
         boundary: str = BOUNDARY) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            + data + b"\r\n")


def body(*parts: bytes, end: bytes = f"--{BOUNDARY}--\r\n".encode()) -> bytes:
    return b"".join(parts) + end


def read(data: bytes, *, sized: bool, chunk: int = 1000, max_files: int = 4, max_bytes: int = 5000):
    """The files, or ("rejected", status): `sized` declares the length, else the body is chunked."""
    async def stream():
        for start in range(0, len(data), chunk):
            yield data[start:start + chunk]

    try:
        files = asyncio.run(read_files(CONTENT_TYPE, str(len(data)) if sized else None, stream(),
                                       field_name="file", max_files=max_files, max_bytes=max_bytes))
    except UploadRejected as exc:
        return "rejected", exc.status_code
    return [(f.filename, f.content_type, bytes(f.data)) for f in files]


def both(data: bytes, **limits):
    in_memory, streamed = read(data, sized=True, **limits), read(data, sized=False, **limits)
    assert in_memory == streamed, (in_memory, streamed)
    return in_memory


BINARY = bytes(range(256)) * 3 + b"\r\n--b0undar" + b"\r\n\r\n--"  # looks like a boundary, is not one

VALID = {
    "one file": body(part("file", b"PNGDATA")),
    "binary with near-boundaries": body(part("file", BINARY)),
    "empty file": body(part("file", b"")),
    "three files": body(*(part("file", bytes([i]) * (100 * i), f"{i}.png") for i in range(1, 4))),
    "other fields are dropped": body(part("note", b"hello", filename=None), part("file", b"A"),
                                     part("other", b"B")),
    "no filename": body(part("file", b"A", filename=None)),
    "unicode filename": body(part("file", b"A", filename="schild-ä.png")),
    "epilogue": body(part("file", b"A"), end=f"--{BOUNDARY}--\r\nignored epilogue".encode()),
    "no line break after closing": body(part("file", b"A"), end=f"--{BOUNDARY}--".encode()),
    "transport padding after a boundary": body(part("file", b"A")).replace(f"--{BOUNDARY}\r\n".encode(),
                                                                           f"--{BOUNDARY} \t \r\n".encode()),
    "a boundary followed by other text inside the data": body(part("file", b"DA\r\n--" + BOUNDARY.encode() + b"xTA")),
    "header names with digits and underscores": body(part("file", b"A").replace(
        b"Content-Type", b"X_Header-2: v\r\nContent-Type")),
    "a long header (under 8 kB)": body(part("file", b"A").replace(b"Content-Type", b"X-Long: " + b"v" * 5000
                                                                    + b"\r\nContent-Type")),
}

REFUSED = {
    "preamble": (b"preamble\r\n" + VALID["one file"], 400),
    "no closing boundary": (body(part("file", b"A"), end=b""), 400),
    "cut inside the data": (body(part("file", b"A" * 50))[:60], 400),
    "headers never end": (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"".encode(), 400),
    "header without a colon": (f"--{BOUNDARY}\r\nContent-Disposition form-data\r\n\r\nA\r\n--{BOUNDARY}--".encode(), 400),
    "junk after the boundary": (f"--{BOUNDARY}junk\r\n".encode() + VALID["one file"], 400),
    "space before a header's colon": (body(part("file", b"A").replace(b"Content-Type:", b"Content-Type :")), 400),
    "a folded header line": (body(part("file", b"A").replace(b"Content-Type: ", b"Content-Type:\r\n ")), 400),
    "LF line breaks": (body(part("file", b"A")).replace(b"\r\n", b"\n"), 400),
    "part headers over 8 kB": (body(part("file", b"A").replace(b"Content-Type", b"X-Long: " + b"v" * 9000
                                                                 + b"\r\nContent-Type")), 400),
    "no field named file": (body(part("image", b"A")), 422),
    "too many files": (body(*(part("file", b"A") for _ in range(5))), 413),
    "file over the limit": (body(part("file", b"A" * 5001)), 413),
}


@pytest.mark.parametrize("name", VALID)
def test_valid_bodies_read_the_same_both_ways(name):
    files = both(VALID[name])
    assert isinstance(files, list) and files


def test_what_the_reader_returns():
    assert both(VALID["three files"]) == [(f"{i}.png", "image/png", bytes([i]) * (100 * i)) for i in range(1, 4)]
    assert both(VALID["other fields are dropped"]) == [("x.png", "image/png", b"A")]
    assert both(VALID["binary with near-boundaries"]) == [("x.png", "image/png", BINARY)]
    assert both(VALID["unicode filename"])[0][0] == "schild-ä.png"


@pytest.mark.parametrize("name", REFUSED)
def test_bad_bodies_are_refused_the_same_both_ways(name):
    data, status = REFUSED[name]
    assert both(data) == ("rejected", status)


@pytest.mark.parametrize("name", ["transport padding after a boundary", "space before a header's colon",
                                  "a boundary followed by other text inside the data"])
def test_small_and_large_bodies_follow_the_same_rules(name):
    """The same parts after a 300 kB field: a small body and a large one are accepted or refused alike."""
    data = VALID[name] if name in VALID else REFUSED[name][0]
    large = part("padding", b"p" * (300 * 1024), filename=None) + data
    assert both(data, max_bytes=400_000) == both(large, max_bytes=400_000)


def test_a_body_split_into_one_byte_chunks_reads_the_same():
    data = VALID["three files"]
    assert read(data, sized=True, chunk=1) == read(data, sized=False, chunk=1) == both(data)


def test_httpx_encoded_bodies_read_the_same_both_ways():
    """Bodies built by a real client library, including a large one that takes the streaming path."""
    files = [("file", (f"{i}.png", bytes([i]) * 3000, "image/png")) for i in range(3)]
    request = httpx.Request("POST", "http://x", files=files)
    data, content_type = request.read(), request.headers["content-type"]
    boundary = content_type.split("boundary=")[1]
    assert both(data.replace(boundary.encode(), BOUNDARY.encode())) == [
        (f"{i}.png", "image/png", bytes([i]) * 3000) for i in range(3)]
    big = [("file", ("big.bin", b"\x00" * (LARGE_BODY_BYTES + 1), "application/octet-stream"))]
    request = httpx.Request("POST", "http://x", files=big)
    data = request.read()
    async def stream():
        yield data

    [upload] = asyncio.run(read_files(request.headers["content-type"], str(len(data)), stream(), field_name="file",
                                      max_files=1, max_bytes=10 * LARGE_BODY_BYTES))
    assert isinstance(upload, Upload) and len(upload.data) == LARGE_BODY_BYTES + 1
