"""Faults that need the real server (`python -m app`, uvicorn, forward worker processes) to show:
slow clients, clients that go away, forward workers that die or stop, and shutdown with clients
still sending. Short timeouts, so each fault resolves in seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer, start_server
from helpers import files, forward_workers, samples, value

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S, BODY_TIMEOUT_S, SHUTDOWN_TIMEOUT_S, WORKER_TIMEOUT_S = 2, 4, 3, 10


def start_fault_server(cnn_snapshot, folder) -> LiveServer:
    return start_server(cnn_snapshot, folder / "server.log", device="cpu",
                        worker_processes="true", instances=2, warmup="false",
                        header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S,
                        shutdown_timeout_s=SHUTDOWN_TIMEOUT_S, worker_timeout_s=WORKER_TIMEOUT_S)


@pytest.fixture(scope="module")
def live(cnn_snapshot, tmp_path_factory) -> LiveServer:
    server = start_fault_server(cnn_snapshot, tmp_path_factory.mktemp("faults"))
    yield server
    server.stop()


def wait_until_exited(pid: int, seconds: float = 30) -> None:
    """Until `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (OSError, IndexError):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running after {seconds} s")


def address(server: LiveServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def trickle(sockets: list[socket.socket], payload: bytes, seconds: float) -> dict[int, tuple[float, bytes]]:
    """Send `payload` one byte per socket every 0.5 s for up to `seconds`; when each socket was closed
    by the server (seconds after the start) and what it answered."""
    started = time.monotonic()
    closed: dict[int, tuple[float, bytes]] = {}
    position = 0
    while len(closed) < len(sockets) and time.monotonic() - started < seconds:
        for i, sock in enumerate(sockets):
            if i in closed:
                continue
            try:
                sock.setblocking(False)
                try:
                    answer = sock.recv(65536)  # read first: what the server said before it closed
                except BlockingIOError:
                    answer = None
                sock.setblocking(True)
                if answer is not None:
                    closed[i] = (time.monotonic() - started, answer)
                elif position < len(payload):
                    sock.send(payload[position:position + 1])
            except OSError:
                closed[i] = (time.monotonic() - started, b"")
        position += 1
        time.sleep(0.5)
    return closed


def connect(server: LiveServer, count: int) -> list[socket.socket]:
    return [socket.create_connection(address(server), timeout=5) for _ in range(count)]


def test_clients_slow_to_send_headers_are_cut_off(live, sign_png):
    sockets = connect(live, 20)
    try:
        head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        closed = trickle(sockets, head, seconds=20)
        with live.client() as client:  # the server is still serving everyone else
            assert client.post("/v1/predict", files=files(("a.png", sign_png))).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
    assert len(closed) == 20, f"{20 - len(closed)} slow clients still connected after 20 s"
    # cut off by the header timeout, long before they would have finished (slack for a busy runner)
    assert all(seconds < 20 / 2 for seconds, _ in closed.values()), closed
    assert all(answer.startswith(b"HTTP/1.1 408") for _, answer in closed.values()), closed


def test_a_client_that_connects_and_sends_nothing_is_cut_off(live):
    [sock] = connect(live, 1)
    sock.settimeout(HEADER_TIMEOUT_S + 5)
    try:
        assert sock.recv(1024).startswith(b"HTTP/1.1 408")
    finally:
        sock.close()


def test_clients_slow_to_send_the_body_get_408(live):
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + b"x" * 1000
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    sockets = connect(live, 20)
    try:
        for sock in sockets:
            sock.sendall(head)
        closed = trickle(sockets, body, seconds=25)
    finally:
        for sock in sockets:
            sock.close()
    assert len(closed) == 20, f"{20 - len(closed)} slow clients still connected after 25 s"
    assert all(seconds < 25 / 2 for seconds, _ in closed.values()), closed
    assert all(answer.startswith(b"HTTP/1.1 408") and b"not received within" in answer
               for _, answer in closed.values()), closed


@pytest.mark.parametrize("declared", [200_000, 3_000_000], ids=["in-memory", "streaming"])
def test_a_client_disconnecting_mid_upload_is_counted_as_such(live, declared):
    with live.client() as client:
        before = samples(client.get("/metrics").text)
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: " + str(declared).encode() + b"\r\n\r\n--b\r\nContent-Disposition: form-data; "
            b'name="file"; filename="a.png"\r\n\r\n')
    log_before = len(live.log())
    for _ in range(3):
        [sock] = connect(live, 1)
        sock.sendall(head + b"\0" * 100_000)
        time.sleep(0.3)  # part of the body is on its way: the upload has begun
        sock.close()
    labels = {"method": "POST", "route": "/v1/predict"}
    deadline = time.monotonic() + 30
    with live.client() as client:
        while True:  # the server notices each disconnect when it next reads
            after = samples(client.get("/metrics").text)
            counted = value(after, "signserve_http_requests_total", **labels, status="499") - \
                value(before, "signserve_http_requests_total", **labels, status="499")
            if counted >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert counted == 3
    assert value(after, "signserve_http_requests_total", **labels, status="500") == \
        value(before, "signserve_http_requests_total", **labels, status="500")
    log = live.log()[log_before:]
    assert log.count("disconnected during POST /v1/predict") == 3, log
    assert "Traceback" not in log, log


def test_a_worker_that_died_while_idle_costs_no_request(live, sign_png):
    with live.client() as client:
        assert client.post("/v1/predict", files=files(("a.png", sign_png))).status_code == 200
        workers = forward_workers(live)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        wait_until_exited(workers[0])
        statuses = [client.post("/v1/predict", files=files(("a.png", sign_png))).status_code for _ in range(6)]
        assert statuses == [200] * 6, statuses
        wait_for_full_capacity(client)
    assert workers[0] not in forward_workers(live)


def wait_for_full_capacity(client: httpx.Client, seconds: float = 900) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready = client.get("/readyz")
        if ready.status_code == 200 and ready.json()["status"] == "ready":
            return ready.json()
        time.sleep(0.5)
    raise AssertionError(f"not back to full capacity: {ready.text}")


def test_a_stopped_worker_is_replaced_and_its_requests_answered(live, sign_png):
    with live.client(timeout=60) as client:
        wait_for_full_capacity(client)
        workers = forward_workers(live)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGSTOP)
        try:
            def one(i: int) -> int:
                return client.post("/v1/predict", files=files((f"{i}.png", sign_png))).status_code

            def frozen_but_not_yet_replaced() -> bool:
                """/readyz says degraded while the stopped worker still exists (before the watchdog)."""
                with live.client() as probe:
                    while time.monotonic() - started < WORKER_TIMEOUT_S:
                        ready = probe.get("/readyz").json()
                        if (ready["status"], ready["workers_running"]) == ("degraded", 1):
                            return workers[0] in forward_workers(live)
                        time.sleep(0.05)
                return False

            started = time.monotonic()
            with ThreadPoolExecutor(9) as pool:
                noticed = pool.submit(frozen_but_not_yet_replaced)
                statuses = list(pool.map(one, range(32)))
                assert noticed.result(), "a frozen worker was not reported before its replacement"
            answered_in = time.monotonic() - started
            assert set(statuses) <= {200, 504}, statuses
            assert answered_in < 6 * WORKER_TIMEOUT_S, answered_in
            seen = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ready = client.get("/readyz").json()
                seen.append((ready["status"], ready["workers_running"], ready["workers_expected"]))
                if ready["status"] == "degraded":
                    break
                time.sleep(0.2)
            assert ("degraded", 1, 2) in seen or statuses.count(504) > 0, seen
            assert wait_for_full_capacity(client)["workers_running"] == 2
            assert one(0) == 200
        finally:
            try:
                os.kill(workers[0], signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert workers[0] not in forward_workers(live)  # killed, not left stopped
    assert "did not answer within" in live.log()


def test_shutdown_is_bounded_with_clients_still_sending(cnn_snapshot, tmp_path):
    live = start_fault_server(cnn_snapshot, tmp_path)  # its own: this test ends the server
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000\r\n\r\n")
    sockets = connect(live, 10)
    try:
        for sock in sockets:
            sock.sendall(head + b"--b\r\n")
        time.sleep(0.5)
        started = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        try:
            live.process.wait(SHUTDOWN_TIMEOUT_S + BODY_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {time.monotonic() - started:.0f} s after SIGTERM")
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S + BODY_TIMEOUT_S + 5
    finally:
        for sock in sockets:
            sock.close()
        live.stop()
