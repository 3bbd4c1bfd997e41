#!/usr/bin/env bash
# Start a one-node Slurm cluster on loopback (munged, slurmctld, slurmd) and wait until its node is idle.
# Idempotent: a cluster that already answers is left alone. Runs as root; needs Debian's slurm-wlm and
# munge (.ci/system-packages.sh installs them).
#   bash .ci/slurm/start.sh && sinfo
set -euo pipefail
cd "$(dirname "$0")"

SLURM_CONF_FILE=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT_S=${SLURM_START_TIMEOUT:-60}

for cmd in munged slurmctld slurmd sinfo; do
  command -v "$cmd" >/dev/null || { echo "start.sh: $cmd not found; apt-get install slurm-wlm munge" >&2; exit 1; }
done

node_state() { sinfo --noheader --Node --format=%t 2>/dev/null | head -n1; }

wanted=$(bash slurm-conf.sh)
if [[ $(node_state) =~ ^(idle|mix|alloc) ]] && [[ $wanted == "$(cat "$SLURM_CONF_FILE" 2>/dev/null)" ]]; then
  echo "slurm: already running ($(sinfo --noheader --Node --format='%N %t %c CPUs'))"
  exit 0
fi

# munge: one key shared by all daemons (here one host); Debian's postinst usually created it already.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
if ! munge -n </dev/null >/dev/null 2>&1; then
  runuser -u munge -- munged
fi
for _ in $(seq 20); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n </dev/null | unmunge >/dev/null || { echo "start.sh: munged does not answer" >&2; exit 1; }

install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$(dirname "$SLURM_CONF_FILE")"
printf "%s\n" "$wanted" > "$SLURM_CONF_FILE"

# Stale daemons from an earlier start with another configuration would not answer for this one.
for daemon in slurmctld slurmd; do
  pid=$(cat "/run/$daemon.pid" 2>/dev/null || true)
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
done
slurmctld -f "$SLURM_CONF_FILE"
slurmd -f "$SLURM_CONF_FILE"

deadline=$((SECONDS + TIMEOUT_S))
until [[ $(node_state) =~ ^(idle|mix|alloc) ]]; do
  if ((SECONDS > deadline)); then
    echo "start.sh: node not idle after ${TIMEOUT_S}s (state '$(node_state)'); logs in /var/log/slurm" >&2
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
  fi
  sleep 1
done
echo "slurm: $(sinfo --noheader --Node --format='%N %t %c CPUs %m MB')"
