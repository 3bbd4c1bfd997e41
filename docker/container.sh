#!/usr/bin/env bash
# docker/compose.yaml with whichever container engine the machine has: Docker where its daemon answers,
# otherwise podman through its Docker-compatible API socket, which each command starts for its own
# duration and stops again (the containers keep running under podman's conmon, nothing else lingers).
#
#   docker/container.sh up               build the image (layer cache: quick when nothing changed), start
#                                        the api service, wait until its healthcheck reports healthy
#   docker/container.sh down             stop and remove the stack's containers and network
#   docker/container.sh wait             wait until the api container is healthy (after a restart)
#   docker/container.sh health           the api container's health status (starting, healthy, unhealthy)
#   docker/container.sh compose ARGS...  any compose command on the stack (ps, logs, exec -T api ..., restart)
#   docker/container.sh engine ARGS...   the engine's own CLI (docker or podman) with the same settings
#   docker/container.sh which            print the engine in use
#   docker/container.sh pip-build-args   the options a podman build gets from the host's pip settings
#
# Environment: compose's SIGNSERVE_BIND, SIGNSERVE_PORT and SIGNSERVE_CHECKPOINTS (see compose.yaml);
#   SIGNSERVE_PROJECT  compose project name (signserve)
#   IMAGE              image tag (signserve:cpu, as in compose.yaml)
#   BASE_IMAGE         default: the official python:3.11-slim-bookworm where Docker Hub answers, otherwise
#                      a Debian bookworm image made here with debootstrap (localhost/debian-python:bookworm)
#   TORCH_INDEX        default: PyTorch's CPU wheel index where it answers, otherwise empty (the pinned
#                      torch from pip's configured indexes)
#   HEALTH_TIMEOUT     seconds `up` waits for healthy (600)
# With podman the build also gets the host's pip configuration (`pip config list`: index-url,
# extra-index-url, find-links, cert) as build arguments, with its local folders and CA bundle mounted
# read-only, so local wheels are installed instead of downloaded (and a TLS-re-signing proxy is trusted).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPOSE_FILE="$ROOT/docker/compose.yaml"
PROJECT=${SIGNSERVE_PROJECT:-signserve}
IMAGE=${IMAGE:-signserve:cpu}
LOCAL_BASE=localhost/debian-python:bookworm
OFFICIAL_BASE=docker.io/library/python:3.11-slim-bookworm
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}

log() { echo "container.sh: $*" >&2; }
die() { log "$*"; exit 1; }

answers() {  # URL -> success when an HTTP server answers there at all (any status code)
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 8 "$1" 2>/dev/null) || true
  [ -n "$code" ] && [ "$code" != 000 ]
}

# ------------------------------------------------------------------ the engine

ENGINE=""
SERVICE_PID=""
RUN_DIR=""

stop_podman_service() {
  if [ -n "$SERVICE_PID" ]; then
    kill "$SERVICE_PID" 2>/dev/null || true
    wait "$SERVICE_PID" 2>/dev/null || true
    SERVICE_PID=""
  fi
  if [ -n "$RUN_DIR" ]; then rm -rf "$RUN_DIR"; RUN_DIR=""; fi
}

start_podman_service() {
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/docker/containers.conf}
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/signserve-podman.XXXXXX")
  trap stop_podman_service EXIT
  trap 'exit 143' TERM INT  # so that the EXIT trap runs
  podman system service --time=0 "unix://$RUN_DIR/podman.sock" >"$RUN_DIR/service.log" 2>&1 &
  SERVICE_PID=$!
  export DOCKER_HOST="unix://$RUN_DIR/podman.sock"
  for _ in $(seq 100); do
    [ -S "$RUN_DIR/podman.sock" ] && curl -sf --max-time 5 --unix-socket "$RUN_DIR/podman.sock" \
      http://d/_ping >/dev/null && return 0
    kill -0 "$SERVICE_PID" 2>/dev/null || break
    sleep 0.2
  done
  cat "$RUN_DIR/service.log" >&2
  die "podman's API socket did not come up (try 'bash .ci/system-packages.sh' as root)"
}

pick_engine() {
  if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null; then
    ENGINE=podman
    start_podman_service
  else
    die "no container engine: install Docker (https://docs.docker.com/engine/install/) or podman (apt-get install podman runc)"
  fi
}

engine() { "$ENGINE" "$@"; }

compose() {
  local cmd
  if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
    cmd=(docker compose)
  elif command -v docker-compose >/dev/null; then
    cmd=(docker-compose)
  else
    die "no compose: install the Docker Compose plugin or docker-compose (apt-get install docker-compose)"
  fi
  "${cmd[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
}

# ------------------------------------------------------------------ the image

local_base_image() {  # a Debian bookworm image with Python 3.11, for machines without an image registry
  engine image inspect "$LOCAL_BASE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || die "no image registry and no debootstrap to make a base image (apt-get install debootstrap)"
  local rootfs
  rootfs=$(mktemp -d /var/tmp/signserve-rootfs.XXXXXX)
  log "making $LOCAL_BASE with debootstrap in $rootfs"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
       "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; die "debootstrap failed"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | engine import - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
}

pip_config_build_args() {  # the host's pip index, find-links and CA bundle settings as podman build options
  local pip line source key value item path
  pip=("$ROOT/.venv/bin/python" -m pip)
  [ -x "$ROOT/.venv/bin/python" ] || pip=(python3 -m pip)
  declare -A found=() from_env=()
  while IFS= read -r line; do  # e.g. global.find-links='/opt/wheels' or :env:.find-links='/opt/wheels'
    source=${line%%.*}; key=${line%%=*}; key=${key#*.}
    value=${line#*=}; value=${value#\'}; value=${value%\'}
    case "$key" in index-url|extra-index-url|find-links|cert) ;; *) continue ;; esac
    [ -n "${from_env[$key]:-}" ] && continue  # the environment overrides every file
    [ "$source" = :env: ] && from_env[$key]=1
    found[$key]=$value  # otherwise files load in order, a later one overrides an earlier one
  done < <("${pip[@]}" config list 2>/dev/null)
  for key in "${!found[@]}"; do
    value=${found[$key]}
    echo "--build-arg"; echo "PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')=$value"
    for item in $value; do
      if [ "$key" = cert ]; then  # the CA bundle pip trusts (a proxy that re-signs TLS needs it)
        if [ -f "$item" ]; then echo "--volume"; echo "$item:$item:ro"; fi
        continue
      fi
      path=${item#file://}
      [ "$path" = "$item" ] && [ "${item#/}" = "$item" ] && continue  # a remote URL: nothing to mount
      # an index's pages link to files beside it (../../files/x.whl): mount the index's parent folder
      [ "$key" = find-links ] || path=$(dirname "$path")
      if [ -d "$path" ]; then echo "--volume"; echo "$path:$path:ro"; fi
    done
  done
}

warn_if_short_of_disk() {  # a first build peaks far above the image's size (the torch layer is copied on commit)
  local root free_gb
  if [ "$ENGINE" = podman ]; then root=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null) || return 0
  else root=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null) || return 0; fi
  [ -d "$root" ] || return 0
  free_gb=$(df -P -B1G "$root" | awk 'NR == 2 { print $4 }')
  if ! engine image inspect "$IMAGE" >/dev/null 2>&1 && [ "${free_gb:-0}" -lt 20 ]; then
    log "warning: ${free_gb} GB free under $root; a first build needs more than 18 GB (docs/docker.md)"
  fi
}

build_image() {
  local base=${BASE_IMAGE:-} torch_index
  if [ -z "$base" ]; then
    if answers https://registry-1.docker.io/v2/; then base=$OFFICIAL_BASE; else local_base_image; base=$LOCAL_BASE; fi
  fi
  if [ -n "${TORCH_INDEX+set}" ]; then torch_index=$TORCH_INDEX
  elif answers "$CPU_TORCH_INDEX/"; then torch_index=$CPU_TORCH_INDEX
  else torch_index=""; log "PyTorch's index does not answer: the image gets the pinned torch from pip's indexes"
  fi
  local args=(-f "$ROOT/docker/Dockerfile" -t "$IMAGE" --build-arg "BASE_IMAGE=$base"
              --build-arg "TORCH_INDEX=$torch_index")
  if [ "$ENGINE" = podman ]; then
    local extra
    mapfile -t extra < <(pip_config_build_args)
    # docker format keeps the Dockerfile's HEALTHCHECK (OCI images have no field for it)
    args+=(--format docker --network host "${extra[@]}")
  fi
  warn_if_short_of_disk
  log "building $IMAGE on $base with $ENGINE"
  engine build "${args[@]}" "$ROOT"
}

# ------------------------------------------------------------------ health

api_container() { compose ps -q api | head -1; }

health() {
  local id
  id=$(api_container)
  [ -n "$id" ] || { echo "absent"; return 0; }
  engine inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id"
}

wait_healthy() {
  local id status deadline=$((SECONDS + HEALTH_TIMEOUT))
  id=$(api_container)
  [ -n "$id" ] || die "no api container"
  while :; do
    # Without systemd podman has no timer to run healthchecks; run the container's own check here.
    [ "$ENGINE" = podman ] && podman healthcheck run "$id" >/dev/null 2>&1 || true
    status=$(health)
    [ "$status" = healthy ] && return 0
    if [ "$(engine inspect --format '{{.State.Running}}' "$id")" != true ] || [ $SECONDS -ge $deadline ]; then
      compose logs --tail 40 api >&2 || true
      die "the api container is $status, not healthy, after $((HEALTH_TIMEOUT - deadline + SECONDS)) s"
    fi
    sleep 2
  done
}

# ------------------------------------------------------------------ commands

cd "$ROOT"
command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  up)
    pick_engine
    build_image
    compose up -d --no-build api
    wait_healthy
    log "healthy: http://${SIGNSERVE_BIND:-127.0.0.1}:${SIGNSERVE_PORT:-8000} ($ENGINE)"
    ;;
  down) pick_engine; compose down --remove-orphans --timeout 20 ;;
  wait) pick_engine; wait_healthy ;;
  health) pick_engine; health ;;
  compose) pick_engine; compose "$@" ;;
  engine) pick_engine; engine "$@" ;;
  which) pick_engine; echo "$ENGINE" ;;
  pip-build-args) pip_config_build_args ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
