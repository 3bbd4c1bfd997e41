"""Cold start: how soon a fresh `python -m app` answers, and how long its runtime choice runs behind it.

    python -m bench.cold_start        # writes artifacts/bench-cold-start.json

Starts the service on the shipped checkpoints with an empty runtime cache (a fresh clone's first
`make serve`), then, from the moment the process starts: the seconds until `/readyz` answers 200,
and until `/v1/models` shows no runtime choice running. Meanwhile it sends one real GTSRB test image
to `/v1/predict` every half second and counts the answers that were not 200 or named another class
than the first answer did (none expected: torch serves until a chosen runtime is swapped in).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import ROOT, free_port, save_report
from models.gtsrb import default_data_root, list_samples

CHECKPOINTS = ROOT / "models" / "checkpoints"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINTS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the choice to end")
    p.add_argument("--output", default=str(ROOT / "artifacts" / "bench-cold-start.json"))
    args = p.parse_args(argv)

    sign = Path(list_samples(default_data_root(), "test")[0][0]).read_bytes()
    port = free_port()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SIGNSERVE_HOST": "127.0.0.1", "SIGNSERVE_PORT": str(port),
               "SIGNSERVE_CHECKPOINT_DIR": args.checkpoint_dir, "SIGNSERVE_BACKEND_CACHE_DIR": cache}
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT)
        ready_s = chosen_s = None
        answers, wrong, first_class, runtimes = 0, 0, None, {}
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                while time.monotonic() - started < args.timeout:
                    if process.poll() is not None:
                        raise SystemExit(f"the service exited with {process.returncode}")
                    try:
                        ready = client.get("/readyz").status_code == 200
                    except httpx.TransportError:
                        ready = False
                    if ready:
                        ready_s = ready_s or time.monotonic() - started
                        response = client.post("/v1/predict", files=[("file", ("sign.jpg", sign, "image/jpeg"))])
                        top = response.json()["results"][0]["predictions"][0]["class_id"] \
                            if response.status_code == 200 else None
                        first_class = first_class if first_class is not None else top
                        answers += 1
                        wrong += top is None or top != first_class
                        models = client.get("/v1/models").json()["models"]
                        runtimes = {m["name"]: f"{m['backend']['backend']}-{m['backend']['precision']}"
                                    for m in models if m.get("backend")}
                        if not any(m["backend"]["choosing"] for m in models if m.get("backend")):
                            chosen_s = time.monotonic() - started
                            break
                    time.sleep(0.5)
        finally:
            process.terminate()
            process.wait(30)
    report = {"ready_s": ready_s, "choice_done_s": chosen_s, "answers_during": answers, "wrong_or_failed": wrong,
              "runtimes": runtimes}
    if ready_s is None or chosen_s is None:
        raise SystemExit(f"not done within {args.timeout} s: {report}")
    print(f"/readyz 200 after {ready_s:.1f} s; runtime choice done after {chosen_s:.1f} s "
          f"({', '.join(f'{k} {v}' for k, v in runtimes.items())}); {answers} answers meanwhile, "
          f"{wrong} failed or changed class")
    save_report(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
