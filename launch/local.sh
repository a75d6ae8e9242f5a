#!/usr/bin/env bash
# Sets up drc_jax on this machine (Debian package + virtual environment), then runs a job.
#
#   bash launch/local.sh main [drc_jax.main flags]   # the embedded default (or any config)
#   bash launch/local.sh test [pytest args]          # the test suite
#   bash launch/local.sh bench [analysis bench flags] # restoration benchmark
#   bash launch/local.sh lint                        # ruff check + ruff format --check
#   bash launch/local.sh setup                       # set up only
#
# Environment: VENV (default .venv in the repo), EXTRAS (pip extras, default: 'test' for main and
# bench, 'test,tfds,torch,reference' for test), DRC_JAX_SKIP_APT=1 to skip the apt step,
# DRC_JAX_TCMALLOC=0 to run on glibc's malloc instead of tcmalloc (launch/tcmalloc.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/tcmalloc.sh
job=${1:-main}
shift || true
venv=${VENV:-.venv}

# Debian packages: real images offline (dataset-fashion-mnist) and tcmalloc (libtcmalloc-minimal4:
# a train step runs about 1.3x faster on it than on glibc's malloc, launch/tcmalloc.sh).
# The test job also installs chromium-headless-shell: a test screenshots a report in it.
packages="dataset-fashion-mnist libtcmalloc-minimal4"
[[ $job == test ]] && packages+=" chromium-headless-shell"
if [[ ${DRC_JAX_SKIP_APT:-0} != 1 ]] && { [[ ! -d /usr/share/datasets/fashion-mnist ]] \
   || ! TCMALLOC_LIB='' drc_jax_tcmalloc_path >/dev/null \
   || { [[ $job == test ]] && ! command -v chromium-headless-shell >/dev/null; }; }; then
  echo "[setup] installing Debian packages $packages" >&2
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $packages >/dev/null
fi

case $job in
  test) extras=${EXTRAS:-test,tfds,torch,reference} ;;
  *) extras=${EXTRAS:-test} ;;
esac
stamp="$venv/.drc_jax_installed_$(echo "$extras" | tr ',' '_')"
if [[ ! -x $venv/bin/python || ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "[setup] installing drc_jax[$extras] into $venv" >&2
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e ".[$extras]" >&2
  if [[ ,$extras, == *,reference,* ]]; then
    # facenet-pytorch's metadata pins torch<2.3; its code runs on the pinned torch (tests check it)
    "$venv/bin/python" -m pip install -q --no-deps facenet-pytorch==2.6.0 >&2
  fi
  touch "$stamp"
fi

[[ $job == lint || $job == setup ]] || drc_jax_preload_tcmalloc
case $job in
  setup) ;;
  main) exec "$venv/bin/python" -m drc_jax.main "$@" ;;
  test)
    [[ ${DRC_JAX_SKIP_APT:-0} == 1 ]] || export DRC_JAX_REQUIRE_BROWSER=1
    # one worker per core (DRC_JAX_TEST_WORKERS), a test file's tests on one worker (module
    # fixtures such as a trained target are built once)
    exec "$venv/bin/python" -m pytest -q -n "${DRC_JAX_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  lint) "$venv/bin/ruff" check . && exec "$venv/bin/ruff" format --check . ;;
  bench) exec "$venv/bin/python" -m drc_jax.analysis bench "$@" ;;
  *) echo "unknown job '$job' (main, test, lint, bench, setup)" >&2; exit 2 ;;
esac
