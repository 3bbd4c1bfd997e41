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
#   CPUS            CPUs per task (default: the batch script's --cpus-per-task)
#   TIME            time limit, e.g. 08:00:00 (default: the batch script's --time)
#   JOB_NAME        job name (default signserve-MODEL); the output file is logs/JOB_NAME-JOBID.out
#   SBATCH_*        anything sbatch itself reads: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, ...
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

flags=(--parsable --chdir "$project_root" --job-name "$job_name")
if ((GPUS > 0)); then
  flags+=(--gres "gpu:$GPUS")
else
  flags+=(--gres none)
fi
[[ -n ${CPUS:-} ]] && flags+=(--cpus-per-task "$CPUS")
[[ -n ${TIME:-} ]] && flags+=(--time "$TIME")
if ((nodes * nproc > 1)); then
  script=training/slurm/train-ddp.sbatch
  flags+=(--nodes "$nodes" --export "ALL,NPROC_PER_NODE=$nproc")
else
  script=training/slurm/train.sbatch
fi

mkdir -p logs  # Slurm does not create the output file's folder; a job without it fails silently
job_id=$(sbatch "${flags[@]}" "$script" "$model" "$epochs" "$@")
job_id=${job_id%%;*}
output=$(scontrol show job "$job_id" 2>/dev/null | sed -n 's/^ *StdOut=//p')
echo "submitted job $job_id: $script, $nodes node(s) x $nproc process(es), $GPUS GPU(s) per node"
echo "output file: ${output:-$project_root/logs/$job_name-$job_id.out}"
echo "follow it with: tail -f ${output:-logs/$job_name-$job_id.out}; cancel with: scancel $job_id"
