#!/usr/bin/env bash
# Runs drc_jax's RePaint benchmark and the PyTorch peer (diffusers RePaintPipeline) on identical
# work, one after the other on this machine, and prints both JSON lines and the images/s ratio.
#
#   bash launch/bench_vs_peer.sh                 # embedded-default UNet (16x16x1, ch 32, (1,2,2))
#   MODEL=paper BATCH=4 STEPS=10 bash launch/bench_vs_peer.sh   # the 35.7M paper UNet at 32x32x3
#
# Variables: MODEL (default|paper), BATCH (16), STEPS (50), JUMP_LENGTH (10), JUMP_N_SAMPLE (2),
# REPEATS (2), PEER (the peer's runner, default launch/peer/run.sh: diffusers' RePaintPipeline in
# an environment with torch and diffusers, made on first use), DRY_RUN=1;
# DRC_JAX_TCMALLOC=0 runs drc_jax on glibc's malloc, PEER_TCMALLOC=1 the peer on tcmalloc too.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/tcmalloc.sh
model=${MODEL:-default}
batch=${BATCH:-16}; steps=${STEPS:-50}; jl=${JUMP_LENGTH:-10}; jn=${JUMP_N_SAMPLE:-2}
repeats=${REPEATS:-2}
peer=${PEER:-launch/peer/run.sh}
case $model in
  default)
    cfg=configs/fashion_mnist.py
    peer_layout=(--ch 32 --ch-mult 1,2,2 --num-res-blocks 1 --attn-res 8 --res 16 --channels 1) ;;
  paper)
    cfg=configs/cifar10.py
    peer_layout=(--ch 128 --ch-mult 1,2,2,2 --num-res-blocks 2 --attn-res 16 --res 32 --channels 3) ;;
  *) echo "MODEL must be default or paper" >&2; exit 2 ;;
esac
ours=(.venv/bin/python -m drc_jax.analysis bench --config="$cfg" --batch="$batch" --steps="$steps"
      --jump_length="$jl" --jump_n_sample="$jn" --repeats="$repeats")
theirs=(bash "$peer" "${peer_layout[@]}" --batch "$batch" --steps "$steps" --jump-length "$jl"
        --jump-n-sample "$jn" --repeats "$repeats")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "${ours[*]}"; echo "${theirs[*]}"; exit 0
fi
# drc_jax on tcmalloc as launch/local.sh runs it; the peer on glibc's malloc unless PEER_TCMALLOC=1
a=$(drc_jax_preload_tcmalloc; "${ours[@]}" 2>/dev/null | tail -1)
b=$([[ ${PEER_TCMALLOC:-0} == 1 ]] && drc_jax_preload_tcmalloc
  "${theirs[@]}" 2>/dev/null | tail -1)
echo "drc_jax: $a"
echo "peer:    $b"
python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); \
print(f'images/s ratio drc_jax/peer = {a[\"images_per_s\"]/b[\"images_per_s\"]:.2f} '\
f'(nfe/image {a[\"nfe_per_image\"]} vs {b[\"nfe_per_image\"]})')" "$a" "$b"
