#!/usr/bin/env bash
# Runs a PyTorch peer script of drc_jax in an environment with torch and diffusers:
#
#   bash launch/peer/run.sh [--ch 32 --ch-mult 1,2,2 --res 16 --channels 1 --batch 16 ...]
#                                          # launch/peer/diffusers_repaint.py with these flags
#   bash launch/peer/run.sh --python       # prints that environment's python (for other scripts)
#
# The environment: PEER_PYTHON if set; else this checkout's .venv when it has torch and diffusers
# (the test job installs the 'torch' extra there); else PEER_VENV (default
# ~/.cache/drc_jax-peer-venv), made on first use with the 'torch' extra's pins (pyproject.toml).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
has_peer() { "$1" -c 'import torch, diffusers' >/dev/null 2>&1; }
py=${PEER_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x $repo/.venv/bin/python ]] && has_peer "$repo/.venv/bin/python"; then
    py=$repo/.venv/bin/python
  else
    venv=${PEER_VENV:-$HOME/.cache/drc_jax-peer-venv}
    if [[ ! -x $venv/bin/python ]] || ! has_peer "$venv/bin/python"; then
      pins=$(python3 -c "import re,sys; t=open(sys.argv[1]).read(); \
print(' '.join(re.search(r'^torch = \[(.*)\]', t, re.M).group(1).replace('\"', '').split(', ')))" \
        "$repo/pyproject.toml")
      echo "[peer] making $venv with $pins" >&2
      python3 -m venv "$venv"
      # shellcheck disable=SC2086  # the pins are separate words
      "$venv/bin/pip" install -q $pins >&2
    fi
    py=$venv/bin/python
  fi
fi
if [[ ${1:-} == --python ]]; then
  echo "$py"
  exit 0
fi
exec "$py" "$here/diffusers_repaint.py" "$@"
