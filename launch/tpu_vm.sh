#!/usr/bin/env bash
# Runs drc_jax on every worker of a Cloud TPU VM slice (one process per worker, all at once).
#
#   TPU_NAME=drc-v5e-16 ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 PROJECT=my-project \
#   WORKDIR=gs://my-bucket/drc/celeba [CONFIG=configs/celeba.py] \
#     bash launch/tpu_vm.sh [--dry-run] [--create] [--skip-setup] [--detach] [-- drc_jax.main flags]
#
# Steps: 1. reuse the slice TPU_NAME (or create it with --create); 2. put the code on every worker
# (this checkout's tracked and untracked, non-ignored files, copied with `tpu-vm scp`; or a
# `git clone` of REPO_URL at REPO_REF) and `pip install -e ".[tpu,gcs]"` into REMOTE_DIR/.venv;
# 3. run `DRC_JAX_DISTRIBUTED=1 python -m drc_jax.main --config=$CONFIG --workdir=$WORKDIR ...`
# on all workers at once. Rerunning the same command resumes an interrupted run.
#
# Required: TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v5litepod-16, v4-32, v6e-16), PROJECT,
#   WORKDIR (gs://...: every worker reads it, process 0 writes it).
# Optional: CONFIG (default configs/celeba.py, relative to the repository root, ':variant' allowed),
#   RUNTIME_VERSION (for --create; default from ACCELERATOR_TYPE), CREATE_FLAGS (more words for
#   `tpu-vm create`, e.g. "--spot"), REPO_URL and REPO_REF (clone instead of copying this
#   checkout; REPO_REF default HEAD), REMOTE_DIR (default drc_jax, relative to the workers' home).
# Options: --dry-run prints every command and runs none (needs no gcloud); --create creates the
#   slice when it does not exist; --skip-setup skips step 2; --detach starts the job under nohup
#   (log in REMOTE_DIR/runs/drc_jax.log on each worker) instead of streaming it over ssh.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "tpu_vm.sh needs bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

dry_run=0 create=0 setup=1 detach=0
extra=()
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --create) create=1 ;;
    --skip-setup) setup=0 ;;
    --detach) detach=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown option '$1' (drc_jax.main flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

: "${TPU_NAME:?set TPU_NAME (name of the TPU VM slice)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v5litepod-16)}"
: "${PROJECT:?set PROJECT (Google Cloud project id)}"
: "${WORKDIR:?set WORKDIR (gs://bucket/path, shared by all workers)}"
CONFIG=${CONFIG:-configs/celeba.py}
REMOTE_DIR=${REMOTE_DIR:-drc_jax}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-HEAD}
read -ra create_flags <<<"${CREATE_FLAGS:-}"

if [[ $WORKDIR != gs://* ]]; then
  echo "tpu_vm.sh: WORKDIR=$WORKDIR must be gs://bucket/path: every worker checks which score" \
    "shards exist, so all of them must see the same workdir" >&2
  exit 2
fi
if [[ -z ${RUNTIME_VERSION:-} ]]; then
  case $ACCELERATOR_TYPE in  # https://cloud.google.com/tpu/docs/runtimes
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z $REPO_URL && ! -f $repo/${CONFIG%%:*} ]]; then
  echo "tpu_vm.sh: warning: ${CONFIG%%:*} is not in $repo, which is what the workers get" >&2
fi

# Prints a command the way it could be pasted into bash; runs it unless --dry-run.
show() {
  local out=+ a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" $a"
    elif [[ $a =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      out+=" ${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q}"
    else
      out+=" ${a@Q}"
    fi
  done
  echo "$out"
}
run() {
  show "$@"
  ((dry_run)) || "$@"
}
# The same for a local shell pipeline given as one string.
run_sh() {
  echo "+ $1"
  ((dry_run)) || bash -o pipefail -c "$1"
}
# Quotes one word for the workers' shell (bash), leaving plain words bare so commands stay legible.
rq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --project="$PROJECT")
ssh_all=("${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all)

# 1. The slice: reuse it when it exists and is READY, create it with --create when absent.
describe=("${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)')
create_cmd=("${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE"
  --version="$RUNTIME_VERSION" "${create_flags[@]}")
if ((dry_run)); then
  show "${describe[@]}"
  if ((create)); then
    echo "# only when the slice does not exist:"
    show "${create_cmd[@]}"
  fi
else
  if ! command -v gcloud >/dev/null; then
    echo "tpu_vm.sh: gcloud not found (install the Google Cloud CLI)" >&2
    exit 1
  fi
  if state=$("${describe[@]}" 2>/dev/null); then
    show "${describe[@]}"
    echo "# $TPU_NAME is $state"
    if [[ $state != READY ]]; then
      echo "tpu_vm.sh: TPU VM $TPU_NAME is $state, not READY. A preempted spot slice cannot" \
        "be restarted: delete it (${gc[*]} delete $TPU_NAME ${where[*]}), then rerun with" \
        "--create." >&2
      exit 1
    fi
  elif ((create)); then
    run "${create_cmd[@]}"
  else
    echo "tpu_vm.sh: TPU VM $TPU_NAME not found in $ZONE (project $PROJECT); pass --create to" \
      "create a $ACCELERATOR_TYPE slice" >&2
    exit 1
  fi
fi

# 2. Code and environment on every worker.
dir=$(rq "$REMOTE_DIR")
if ((setup)); then
  if [[ -n $REPO_URL ]]; then
    fetch="if [ ! -d $dir/.git ]; then git clone -q $(rq "$REPO_URL") $dir; fi"
    fetch+=" && git -C $dir fetch -q origin $(rq "$REPO_REF")"
    fetch+=" && git -C $dir checkout -q --force FETCH_HEAD"
  else
    tarball=${TMPDIR:-/tmp}/drc_jax_src.$TPU_NAME.tar.gz
    ((dry_run)) || trap 'rm -f "$tarball"' EXIT
    # Tracked and untracked files that git does not ignore (so no .venv, runs/, caches), less
    # tracked files deleted from the working tree.
    run_sh "cd $(rq "$repo") && git ls-files -z --cached --others --exclude-standard |\
 while IFS= read -r -d '' f; do if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done |\
 tar -czf $(rq "$tarball") --null -T -"
    run "${gc[@]}" scp "$tarball" "$TPU_NAME:drc_jax_src.tar.gz" "${where[@]}" --worker=all
    # Replace the previous copy (refusing a directory that is not one) but keep its virtual
    # environment and local runs.
    fetch="if [ -n \"\$(ls -A $dir 2>/dev/null)\" ]"
    fetch+=" && ! grep -qs \"^name = .drc_jax.\" $dir/pyproject.toml; then"
    fetch+=" echo \"$dir exists and is not a drc_jax copy; set REMOTE_DIR\" >&2; exit 1; fi"
    fetch+=" && mkdir -p $dir"
    fetch+=" && find $dir -mindepth 1 -maxdepth 1 ! -name .venv ! -name runs -exec rm -rf {} +"
    fetch+=" && tar -xzf drc_jax_src.tar.gz -C $dir && rm drc_jax_src.tar.gz"
  fi
  # TPU VM images ship Python 3.10; drc_jax needs >= 3.11 (Ubuntu 22.04 has python3.11 in apt).
  # One line for the workers' shell; $p and $py expand there.
  read -r -d '' install <<'EOF' || true
py=; for p in python3.13 python3.12 python3.11 python3; do
if command -v $p >/dev/null && $p -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null;
then py=$p; break; fi; done;
if [ -z "$py" ]; then sudo apt-get update -qq
&& sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
&& py=python3.11; fi;
[ -x .venv/bin/python ] || $py -m venv .venv
&& .venv/bin/python -m pip install -q --upgrade pip
&& .venv/bin/python -m pip install -q -e ".[tpu,gcs]"
EOF
  install=${install//$'\n'/ }
  run "${ssh_all[@]}" --command="set -e; $fetch; cd $dir; $install"
fi

# 3. The job: one process per worker, all started together; jax.distributed finds its peers.
job="DRC_JAX_DISTRIBUTED=1 .venv/bin/python -m drc_jax.main --config=$(rq "$CONFIG")"
job+=" --workdir=$(rq "$WORKDIR")"
for a in "${extra[@]}"; do job+=" $(rq "$a")"; done
if ((detach)); then
  job="mkdir -p runs && { nohup env $job >>runs/drc_jax.log 2>&1 </dev/null & }"
  job+=" && echo \"\$(hostname): started, log in \$PWD/runs/drc_jax.log\""
fi
run "${ssh_all[@]}" --command="cd $dir && $job"
