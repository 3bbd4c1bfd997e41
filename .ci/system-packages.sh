#!/usr/bin/env bash
# Debian packages the test suite uses (idempotent).
set -euo pipefail
PACKAGES=(chromium slurm-wlm munge docker-compose)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
