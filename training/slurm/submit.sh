#!/usr/bin/env bash
# `make train`: submit the training job to Slurm where `sbatch` is on the PATH, else train right here.
#
#   bash training/slurm/submit.sh MODEL EPOCHS [training.train flags...]
#
# Environment (all optional):
#   GPUS            GPUs per node; default 1 where `sinfo` lists gpu GRES, else 0 (CPU-only job)
#   NODES           nodes (default 1)
#   NPROC_PER_NODE  training processes per node (default GPUS, at least 1); NODES x NPROC_PER_NODE > 1
#                   submits train-ddp.sbatch (srun torchrun), else train.sbatch
#   CPUS            CPUs per task (default: the batch script's --cpus-per-task, at most the largest node's)
#   TIME            time limit, e.g. 08:00:00 (default: the batch script's --time)
#   JOB_NAME        job name (default signserve-MODEL); the output file is logs/JOB_NAME-JOBID.out
#   SBATCH_*        anything sbatch itself reads: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, ...
#
# Before submitting it compares the request with the partition's nodes (sinfo) and refuses, naming the
# variable to change, a job that no node could ever start.
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 MODEL EPOCHS [training.train flags...]" >&2
  exit 2
fi
model=$1 epochs=$2
shift 2
cd "$(dirname "$0")/../.."
project_root=$PWD

python=${PYTHON:-$project_root/.venv/bin/python}
[[ -x $python ]] || python=python3
nodes=${NODES:-1}

if ! command -v sbatch >/dev/null; then
  nproc=${NPROC_PER_NODE:-1}
  echo "submit.sh: no sbatch on the PATH; training here ($nproc process(es))"
  if ((nproc > 1)); then
    exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
      -m training.train --model "$model" --epochs "$epochs" "$@"
  fi
  exec "$python" -m training.train --model "$model" --epochs "$epochs" "$@"
fi

if [[ -z ${GPUS:-} ]]; then
  if sinfo --noheader --format=%G 2>/dev/null | grep -q gpu; then GPUS=1; else GPUS=0; fi
fi
nproc=${NPROC_PER_NODE:-$((GPUS > 0 ? GPUS : 1))}
job_name=${JOB_NAME:-${SBATCH_JOB_NAME:-signserve-$model}}
if ((nodes * nproc > 1)); then
  script=training/slurm/train-ddp.sbatch
else
  script=training/slurm/train.sbatch
fi
cpus=${CPUS:-$(sed -n 's/^#SBATCH --cpus-per-task=//p' "$script")}

# The request against the partition's nodes, as sinfo reports them: a job that no node can run pends
# forever (reason PartitionConfig) and nothing tells the user. CPUs left at the batch script's default
# are clamped to the largest node; an explicit CPUS, GPUS or NODES beyond what exists is refused.
partition=${SBATCH_PARTITION:-}
# one line per node of the partition (the default one, marked *, unless SBATCH_PARTITION names another):
# node name, CPUs, GPUs (the gpu GRES counts summed, e.g. gpu:a100:4(S:0-1) -> 4)
nodes_seen=$(sinfo --noheader --Node --format='%N %P %c %G' 2>/dev/null | awk -v want="$partition" '
  { p = $2; star = sub(/\*$/, "", p) }
  (want == "" && star) || (want != "" && p == want) {
    gpus = 0; n = split($4, items, ",")
    for (i = 1; i <= n; i++) if (items[i] ~ /^gpu/) { sub(/\(.*/, "", items[i]); k = split(items[i], f, ":"); if (f[k] ~ /^[0-9]+$/) gpus += f[k]; else gpus += 1 }
    print $1, $3, gpus
  }' | sort -u)
if [[ -n $nodes_seen ]]; then
  where="partition ${partition:-$(sinfo --noheader --format=%P 2>/dev/null | sed -n 's/\*$//p' | head -n1)}"
  max_cpus=$(awk '$2 > m { m = $2 } END { print m + 0 }' <<<"$nodes_seen")
  max_gpus=$(awk '$3 > m { m = $3 } END { print m + 0 }' <<<"$nodes_seen")
  node_count=$(wc -l <<<"$nodes_seen")
  if ((GPUS > max_gpus)); then
    if ((max_gpus == 0)); then
      echo "submit.sh: GPUS=$GPUS asks for $GPUS GPU(s) per node, but no node in $where has a GPU;" \
        "set GPUS=0 to train on CPUs, or SBATCH_PARTITION=... for a GPU partition" >&2
    else
      echo "submit.sh: GPUS=$GPUS asks for $GPUS GPU(s) per node, but no node in $where has more than" \
        "$max_gpus; set GPUS=$max_gpus or less" >&2
    fi
    exit 2
  fi
  if ((nodes > node_count)); then
    echo "submit.sh: NODES=$nodes asks for $nodes nodes, but $where has $node_count; set NODES=$node_count or less" >&2
    exit 2
  fi
  if ((cpus > max_cpus)); then
    if [[ -n ${CPUS:-} ]]; then
      echo "submit.sh: CPUS=$CPUS asks for $CPUS CPUs per task, but the largest node in $where has $max_cpus;" \
        "set CPUS=$max_cpus or less (or SBATCH_PARTITION=... for a partition with bigger nodes)" >&2
      exit 2
    fi
    echo "submit.sh: $script asks for --cpus-per-task=$cpus, but the largest node in $where has $max_cpus;" \
      "asking for $max_cpus (set CPUS=N to choose)"
    cpus=$max_cpus
    CPUS=$cpus
  fi
fi

flags=(--parsable --chdir "$project_root" --job-name "$job_name")
if ((GPUS > 0)); then
  flags+=(--gres "gpu:$GPUS")
else
  flags+=(--gres none)
fi
[[ -n ${CPUS:-} ]] && flags+=(--cpus-per-task "$CPUS")
[[ -n ${TIME:-} ]] && flags+=(--time "$TIME")
if [[ $script == training/slurm/train-ddp.sbatch ]]; then
  flags+=(--nodes "$nodes" --export "ALL,NPROC_PER_NODE=$nproc")
fi

mkdir -p logs  # Slurm does not create the output file's folder; a job without it fails silently
job_id=$(sbatch "${flags[@]}" "$script" "$model" "$epochs" "$@")
job_id=${job_id%%;*}
output=$(scontrol show job "$job_id" 2>/dev/null | sed -n 's/^ *StdOut=//p')
echo "submitted job $job_id: $script, $nodes node(s) x $nproc process(es), $GPUS GPU(s) per node"
echo "output file: ${output:-$project_root/logs/$job_name-$job_id.out}"
echo "follow it with: tail -f ${output:-logs/$job_name-$job_id.out}; cancel with: scancel $job_id"
