"""Forward worker processes: a worker that dies is replaced and the service keeps answering."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import start_server
from helpers import files


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def process_server(checkpoint_snapshot, tmp_path_factory):
    live = start_server(checkpoint_snapshot, tmp_path_factory.mktemp("workers") / "server.log",
                        device="cpu", worker_processes="true", instances=2)
    yield live
    live.stop()


def test_a_killed_worker_is_replaced(process_server, sign_png):
    workers = children(process_server.process.pid)
    assert len(workers) >= 2, workers  # the two forward workers (plus multiprocessing's resource tracker)
    with process_server.client() as client:
        assert client.post("/v1/predict", files=files(("a.png", sign_png))).status_code == 200
        # which children are forward workers: the ones that hold the model (big resident memory)
        forward = [pid for pid in workers
                   if int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") > 100e6]
        assert len(forward) == 2, forward
        os.kill(forward[0], signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = client.post("/v1/predict", files=files(("a.png", sign_png)))
            statuses.append(response.status_code)
            if statuses[-3:] == [200, 200, 200] and len(statuses) >= 4:
                break
            if response.status_code != 200:
                assert response.status_code == 503 and "worker died" in response.json()["detail"], response.text
                assert response.headers["Retry-After"] == "1"
        assert statuses[-3:] == [200, 200, 200], statuses
        assert statuses.count(503) <= 1  # only the batch that was on the dead worker
        assert client.get("/readyz").status_code == 200
    assert process_server.process.poll() is None
    assert "died" in process_server.log()
