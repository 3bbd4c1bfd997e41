#!/usr/bin/env bash
# `make detect-cluster`: a Slurm job array over the files under INPUT, then a merge job.
#
#   bash batch/slurm/submit.sh INPUT OUTPUT SHARDS [signserve detect flags...]
#
# Each array task takes a stable share of the files (a hash of each path) and writes its own shard
# file, resumable; the merge job waits for every task to succeed (afterok) and leaves OUTPUT with
# every frame exactly once. SBATCH_* variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...) pass through.
set -euo pipefail

if (($# < 3)); then
  echo "usage: $0 INPUT OUTPUT SHARDS [signserve detect flags...]" >&2
  exit 2
fi
input=$1 output=$2 shards=$3
shift 3
cd "$(dirname "$0")/../.."
if ! command -v sbatch >/dev/null; then
  echo "submit.sh: no Slurm here (sbatch is not on the PATH); run it on this machine instead:" >&2
  echo "  .venv/bin/signserve detect $input -o $output $*" >&2
  exit 1
fi
if ! [[ $shards =~ ^[1-9][0-9]*$ ]]; then
  echo "submit.sh: SHARDS must be a positive number, got '$shards'" >&2
  exit 2
fi
mkdir -p logs "$(dirname "$output")"
input=$(realpath "$input") output=$(realpath -m "$output")
array=$(sbatch --parsable --chdir "$PWD" --array="0-$((shards - 1))" batch/slurm/detect.sbatch "$output" "$shards" "$input" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --chdir "$PWD" --dependency="afterok:$array" batch/slurm/merge.sbatch "$output" "$shards")
merge=${merge%%;*}
echo "submitted job array $array: $shards task(s) over $input"
echo "submitted merge job $merge: after every task succeeds, writes $output"
echo "output files: logs/signserve-detect-${array}_*.out, logs/signserve-merge-$merge.out"
echo "follow with: squeue -j $array,$merge; cancel with: scancel $array $merge"
