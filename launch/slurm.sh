#!/usr/bin/env bash
# Submits drc_jax as a multi-node GPU job to SLURM (runs launch/slurm.sbatch).
#
#   WORKDIR=/shared/runs/celeba CONFIG=configs/celeba.py NODES=4 GPUS_PER_NODE=8 \
#   [PARTITION=gpu] [ACCOUNT=my-account] [VENV=/shared/venvs/drc_jax] \
#     bash launch/slurm.sh [--dry-run] [-- drc_jax.main flags]
#
# Required: WORKDIR (a directory every node shares, or gs://bucket/path; a relative path is taken
#   from the current directory), CONFIG (relative to the repository root, ':variant' allowed),
#   NODES, GPUS_PER_NODE.
# Optional: PARTITION, ACCOUNT, TIME (default 24:00:00), VENV (virtual environment with
#   drc_jax[cuda12]; default: the `python` on PATH at submission), LAYOUT (gpu: one task per GPU,
#   the default; node: one task per node driving all its GPUs), JOB_NAME (default drc_jax),
#   LOG_DIR (default runs/slurm in the repository), SBATCH_FLAGS (more sbatch words, e.g.
#   "--exclusive --qos=high").
# --dry-run prints the sbatch command and the job step the batch script would run; submits nothing.
# Resubmitting the same command after a preemption or failure resumes from the workdir.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "slurm.sh needs bash >= 4.4 (this is $BASH_VERSION)" >&2
  exit 2
fi

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

dry_run=0
extra=()
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "slurm.sh: unknown option '$1' (drc_jax.main flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

: "${WORKDIR:?set WORKDIR (run directory shared by all nodes, or gs://bucket/path)}"
: "${CONFIG:?set CONFIG (e.g. configs/celeba.py)}"
: "${NODES:?set NODES (number of nodes)}"
: "${GPUS_PER_NODE:?set GPUS_PER_NODE (GPUs on each node)}"
for v in NODES GPUS_PER_NODE; do
  if [[ ! ${!v} =~ ^[1-9][0-9]*$ ]]; then
    echo "slurm.sh: $v=${!v} is not a positive integer" >&2
    exit 2
  fi
done
LAYOUT=${LAYOUT:-gpu}
case $LAYOUT in
  gpu) tasks_per_node=$GPUS_PER_NODE ;;
  node) tasks_per_node=1 ;;
  *) echo "slurm.sh: LAYOUT=$LAYOUT: expected gpu or node" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
# The job runs in the repository root: make paths given relative to here absolute.
absolute() { if [[ $1 == /* || $1 == *://* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
WORKDIR=$(absolute "$WORKDIR")
[[ -z ${VENV:-} ]] || VENV=$(absolute "$VENV")
log_dir=$(absolute "${LOG_DIR:-$repo/runs/slurm}")
if [[ ! -f $repo/${CONFIG%%:*} && ${CONFIG%%:*} != /* ]]; then
  echo "slurm.sh: warning: ${CONFIG%%:*} is not in $repo" >&2
fi
read -ra sbatch_flags <<<"${SBATCH_FLAGS:-}"

cmd=(sbatch --export=ALL --chdir="$repo" --job-name="${JOB_NAME:-drc_jax}" --nodes="$NODES"
  --ntasks-per-node="$tasks_per_node" --gpus-per-node="$GPUS_PER_NODE"
  --time="${TIME:-24:00:00}" --output="$log_dir/%x-%j.out")
[[ -z ${PARTITION:-} ]] || cmd+=(--partition="$PARTITION")
[[ -z ${ACCOUNT:-} ]] || cmd+=(--account="$ACCOUNT")
cmd+=("${sbatch_flags[@]}" "$repo/launch/slurm.sbatch" "${extra[@]}")
export WORKDIR CONFIG GPUS_PER_NODE LAYOUT
[[ -z ${VENV:-} ]] || export VENV

if ((dry_run)); then
  # Quotes a word only when bash needs it.
  q() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
  }
  line=+
  for a in "${cmd[@]}"; do line+=" $(q "$a")"; done
  echo "+ mkdir -p $(q "$log_dir")"
  echo "$line"
  echo "# job environment: WORKDIR=$(q "$WORKDIR") CONFIG=$(q "$CONFIG") LAYOUT=$LAYOUT" \
    "GPUS_PER_NODE=$GPUS_PER_NODE${VENV:+ VENV=$(q "$VENV")}"
  echo "# launch/slurm.sbatch then runs this job step on $NODES nodes x $tasks_per_node task(s)," \
    "$((NODES * GPUS_PER_NODE)) GPUs:"
  cd "$repo"
  DRC_JAX_DRY_RUN=1 bash launch/slurm.sbatch "${extra[@]}"
  exit 0
fi
if ! command -v sbatch >/dev/null; then
  echo "slurm.sh: sbatch not found (run this on a SLURM login node)" >&2
  exit 1
fi
mkdir -p "$log_dir"
echo "logs: $log_dir/${JOB_NAME:-drc_jax}-<job id>.out" >&2
exec "${cmd[@]}"
