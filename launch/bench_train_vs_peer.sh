#!/usr/bin/env bash
# One training step of the embedded-default UNet (16x16x1, ch 32, (1,2,2), batch 64): drc_jax's
# jitted step (python -m drc_jax.analysis bench --train_step) and the same step in PyTorch (a diffusers
# UNet2DModel of the same layout, launch/torch_train_step.py, in the peer's environment), one after
# the other on this machine; prints both JSON lines and the speed ratio.
#
#   bash launch/bench_train_vs_peer.sh
#
# Variables: BATCH (64), REPEATS (20 timed steps, median), PEER_PYTHON / PEER_VENV (the PyTorch
# environment, launch/peer/run.sh: this checkout's .venv when it has torch and diffusers, else a
# virtual environment made on first use), DRY_RUN=1;
# DRC_JAX_TCMALLOC=0 runs drc_jax on glibc's malloc, PEER_TCMALLOC=1 the peer on tcmalloc too.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/tcmalloc.sh
batch=${BATCH:-64}; repeats=${REPEATS:-20}
ours=(.venv/bin/python -m drc_jax.analysis bench --config=configs/fashion_mnist.py --train_step
      --repeats="$repeats" --config.train.batch_size="$batch")
theirs=(launch/torch_train_step.py --batch "$batch" --repeats "$repeats")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "${ours[*]}"; echo "\$(bash launch/peer/run.sh --python) ${theirs[*]}"; exit 0
fi
theirs=("$(bash launch/peer/run.sh --python)" "${theirs[@]}")
# drc_jax on tcmalloc as launch/local.sh runs it; the peer on glibc's malloc unless PEER_TCMALLOC=1
a=$(drc_jax_preload_tcmalloc; "${ours[@]}" 2>/dev/null | tail -1)
b=$([[ ${PEER_TCMALLOC:-0} == 1 ]] && drc_jax_preload_tcmalloc
  "${theirs[@]}" 2>/dev/null | tail -1)
echo "drc_jax: $a"
echo "torch:   $b"
python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); \
print(f'train step speed ratio drc_jax/torch = {b[\"seconds_per_step\"]/a[\"seconds_per_step\"]:.2f} '\
f'({a[\"seconds_per_step\"]} s vs {b[\"seconds_per_step\"]} s at batch {a[\"batch\"]})')" "$a" "$b"
