"""Processes for the bench: servers on loopback ports, and wrk runs against them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().parent / "multipart.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(name: str, command: list[str], port: int, ready_path: str, env: dict[str, str] | None = None,
          log_dir: Path | None = None, timeout_s: float = 180, chosen: bool = False) -> Server:
    """Run `command` (which must listen on 127.0.0.1:port) until GET ready_path answers 200 and, with
    `chosen` (signserve), until its runtimes are chosen."""
    log = open(log_dir / f"{name}.log", "wb") if log_dir else subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                               stderr=subprocess.STDOUT)
    server = Server(name, f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} (log in {log_dir})")
        try:
            with urllib.request.urlopen(server.url + ready_path, timeout=2) as response:
                if response.status == 200:
                    if chosen:
                        wait_until_chosen(server.url, timeout_s)
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} not ready after {timeout_s} s")


def save_report(report: dict, path: str | Path) -> None:
    """The run's figures as JSON (artifacts/), and as the last stdout line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


def wait_until_chosen(url: str, timeout_s: float = 900) -> None:
    """Wait until signserve at `url` has chosen every model's runtime (it serves on torch until then),
    so what is timed is what it serves for good."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
            models = json.load(response)["models"]
        if not any((m.get("backend") or {}).get("choosing") for m in models):
            return
        time.sleep(1)
    raise RuntimeError(f"the runtime choice at {url} did not end within {timeout_s} s")


def uvicorn_command(target: str, port: int, factory: bool = False) -> list[str]:
    """The same uvicorn configuration the service runs with (httptools + uvloop when installed)."""
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
               "--no-access-log", "--log-level", "warning"]
    return command + (["--factory"] if factory else [])


def multipart_body(image: bytes, filename: str, directory: Path) -> tuple[Path, str]:
    boundary = "signservebench7f3a9c"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    path = directory / "body.bin"
    path.write_bytes(body)
    return path, boundary


def wrk_available() -> str:
    """The wrk binary; installs Debian's package when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: installing Debian's wrk package", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "wrk"], check=True, env=env)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("the bench needs wrk: `apt-get install wrk` (Debian/Ubuntu)")
    return found


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, all cores summed (Linux /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), idle / os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system CPU ticks) of every process, from /proc/PID/stat."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it exited while we looked
            table[int(entry.name)] = (int(stat[1]), int(stat[11]) + int(stat[12]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """The living children of `pid`, their children, and so on (not `pid` itself)."""
    table = _processes() if table is None else table
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier and child not in found}
        found |= frontier
    return found


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its living descendants (the service's forward workers)."""
    table = _processes()
    ticks = sum(table[p][1] for p in descendants(pid, table) | {pid} if p in table)
    return ticks / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, connections: int, duration_s: int, body: Path, boundary: str, threads: int = 1) -> dict:
    """One wrk run: closed loop, `connections` keep-alive connections each with one request in flight."""
    command = [wrk_available(), f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s}s",
               "--timeout", "10s", "-s", str(LUA_SCRIPT), url]
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_BOUNDARY": boundary}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw["errors"].values())
    return {
        "connections": connections,
        "requests": raw["requests"],
        "errors": errors,
        "requests_per_s": (raw["requests"] - raw["errors"]["status"]) / seconds,
        "p50_ms": raw["latency_us"]["p50"] / 1000,
        "p95_ms": raw["latency_us"]["p95"] / 1000,
        "p99_ms": raw["latency_us"]["p99"] / 1000,
        "mean_ms": raw["latency_us"]["mean"] / 1000,
    }
