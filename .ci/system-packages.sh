#!/usr/bin/env bash
# Debian packages the test suite uses (idempotent).
set -euo pipefail
# podman + runc + debootstrap: the container engine for tests/test_container.py where Docker is absent
# (docker/container.sh makes the base image with debootstrap when no image registry is reachable).
PACKAGES=(chromium nodejs slurm-wlm munge docker-compose podman runc debootstrap iptables)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q -o DPkg::Lock::Timeout=600
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}"
fi
