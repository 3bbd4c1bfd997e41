#!/usr/bin/env bash
# Services the test suite talks to (each start script is idempotent).
set -euo pipefail
bash .ci/slurm/start.sh
