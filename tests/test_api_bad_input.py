"""Bad input gets a clear 4xx whose JSON `detail` names the problem; never a 500, a hang or a crash.

Most requests go to the app in this process (`inprocess`); the two that need a real socket (a body
cut off mid-stream, a huge declared length) go to the real server process."""

from __future__ import annotations

import os
import socket

import pytest

from helpers import encode, files, png_declaring
from models.classes import NUM_CLASSES

MB = 1024 * 1024


def expect(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = detail if isinstance(detail, str) else str(detail)
    for word in words:
        assert word.lower() in text.lower(), (word, detail)


def assert_healthy(client, any_png) -> None:
    """Probes answer and a good image still classifies."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/predict", files=files(("ok.png", any_png))).status_code == 200


@pytest.fixture(scope="module")
def any_image():
    """A made-up 48x48 photo: these tests are about bad input, and need no real sign to run."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def any_png(any_image):
    return encode(any_image, "PNG")


@pytest.fixture(autouse=True)
def app_stays_healthy(inprocess, any_png):
    """After every bad request the app still answers."""
    yield
    assert_healthy(inprocess, any_png)


@pytest.fixture
def client(inprocess):
    return inprocess


@pytest.fixture
def process_stays_healthy(server, any_png):
    """After a bad request over a real socket: the process lives, probes answer, a good image classifies."""
    yield
    assert server.process.poll() is None, server.log()
    with server.client() as http:
        assert_healthy(http, any_png)


def test_empty_file(client):
    expect(client.post("/v1/predict", files=files(("empty.png", b""))), 422, "empty.png", "empty")


def test_not_an_image(client):
    expect(client.post("/v1/predict", files=files(("notes.txt", b"these are not the pixels you are looking for"))),
           422, "notes.txt", "not an image")


def test_random_bytes(client):
    expect(client.post("/v1/predict", files=files(("noise.jpg", os.urandom(50_000)))), 422, "noise.jpg")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF"])
def test_truncated_image(client, any_image, fmt):
    data = encode(any_image, fmt)
    truncated = data[: len(data) // 2]
    expect(client.post("/v1/predict", files=files((f"cut.{fmt.lower()}", truncated))), 422, "cut.", "truncated")


def test_corrupt_header(client, any_png):
    broken = any_png[:16] + b"\xff" * 16 + any_png[32:]  # IHDR overwritten
    response = client.post("/v1/predict", files=files(("broken.png", broken)))
    expect(response, 422, "broken.png")


@pytest.mark.parametrize("width,height", [(9_000, 9_000), (100_000, 100_000)])
def test_decompression_bomb_is_refused_before_decoding(client, width, height):
    """A few hundred bytes declaring 81 M (above our limit) or 10 G pixels (above Pillow's own)."""
    budget = client.app.state.service.decode_budget
    budget.reset_peak()
    response = client.post("/v1/predict", files=files(("bomb.png", png_declaring(width, height))))
    expect(response, 413, "bomb.png", "decompression bomb")
    assert budget.peak == 0  # refused from its header: not a pixel was decoded


def test_gif_bomb(client):
    header = b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + \
        (65535).to_bytes(2, "little") * 2 + b"\x00\x02\x02\x44\x01\x00;"
    expect(client.post("/v1/predict", files=files(("bomb.gif", header))), 413, "bomb.gif", "pixels")


def test_one_bad_file_fails_the_batch_and_names_it(client, any_png):
    response = client.post("/v1/predict", files=files(("a.png", any_png), ("b.png", b"nope"), ("c.png", any_png)))
    expect(response, 422, "b.png")


def test_upload_over_size_limit(client):
    big = os.urandom(10 * MB + 1)
    expect(client.post("/v1/predict", files=files(("huge.png", big))), 413, "huge.png", "10 MB")


def read_response(sock: socket.socket) -> str:
    """One HTTP/1.1 response (headers and Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        received = sock.recv(65536)
        assert received, f"connection closed after {data!r}"
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        received = sock.recv(65536)
        assert received, "connection closed mid-body"
        body += received
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_size_limit_is_enforced_while_reading(server, process_stays_healthy):
    """Declare a 50 MB file, send a bit more than 10 MB of it and stop: the 413 must come back
    without the server waiting for (or buffering) the rest."""
    host, port = server.url.removeprefix("http://").split(":")
    boundary = "signserveboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"endless.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    total = len(head) + 50 * MB
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
               f"boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode() + head
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(request)
        chunk = b"\0" * MB
        for _ in range(11):
            sock.sendall(chunk)
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "endless.bin" in reply and "10 MB" in reply


def test_request_body_declared_larger_than_all_limits(server, process_stays_healthy):
    host, port = server.url.removeprefix("http://").split(":")
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
               f"Content-Length: {10 ** 12}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(request)
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]


def test_too_many_files(client, any_png):
    limit = 64
    response = client.post("/v1/predict", files=files(*[(f"{i}.png", any_png) for i in range(limit + 1)]))
    expect(response, 413, "too many files", str(limit))
    assert client.post("/v1/predict", files=files(*[(f"{i}.png", any_png) for i in range(limit)])).status_code == 200


def test_unknown_model(client, any_png):
    response = client.post("/v1/predict", params={"model": "alexnet"}, files=files(("a.png", any_png)))
    expect(response, 404, "alexnet", "available")


@pytest.mark.parametrize("top_k", ["0", "-1", str(NUM_CLASSES + 1), "five"])
def test_top_k_out_of_range(client, any_png, top_k):
    response = client.post("/v1/predict", params={"top_k": top_k}, files=files(("a.png", any_png)))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["query", "top_k"]


def test_missing_file_field(client, any_png):
    response = client.post("/v1/predict", files=files(("a.png", any_png), field="image"))
    expect(response, 422, "file")
    expect(client.post("/v1/predict", data={"note": "no file"}, files=files(("x", b"1"), field="other")), 422, "file")


def test_not_multipart(client):
    expect(client.post("/v1/predict", json={"file": "sign.png"}), 415, "multipart/form-data")
    expect(client.post("/v1/predict"), 415, "multipart/form-data")


def test_malformed_multipart(client):
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc"  # no end
    response = client.post("/v1/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    expect(response, 400, "multipart")
    response = client.post("/v1/predict", content=b"abc", headers={"Content-Type": "multipart/form-data"})
    expect(response, 400, "boundary")


def test_unknown_routes_and_methods(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/predict").status_code == 405
