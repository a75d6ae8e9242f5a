#!/usr/bin/env bash
# The README's GPU figures in one prepared run (launch/bench_gpu.py: the paper UNet's forward and
# RePaint at batch 64 and 256 in float32 and bfloat16, the fraction of the GPU's dense peak, and
# diffusers' RePaintPipeline on the same GPU and UNet). Made for a lent GPU machine whose image has
# JAX with CUDA, flax, optax and torch but no network, and lacks ml-collections and diffusers:
#
#   bash launch/bench_gpu.sh --prepare   # here, once: wheels into .whl/ (git-ignored)
#   bash launch/bench_gpu.sh             # there (carry .whl): figures into $OUT (else
#                                        # runs/gpu), table on stdout; under 10 minutes on an H100
#   QUICK=1 bash launch/bench_gpu.sh     # tiny batches and steps on any backend: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == --prepare ]]; then
  rm -rf .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    ml-collections==1.1.0 diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
  ls .whl
  exit 0
fi
py=${PYTHON:-}  # this checkout's .venv where there is one (here), else the image's python3 (there)
[[ -z $py && -x .venv/bin/python ]] && py=.venv/bin/python
py=${py:-python3}
if [[ -d .whl ]]; then  # what the GPU image lacks, installed beside it (not over it)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/drc-site .whl/*.whl
  export PYTHONPATH=/tmp/drc-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
args=(--out="$out")  # the PyTorch side: launch/torch_repaint.py with launch/peer/
[[ ${QUICK:-0} == 1 ]] && args+=(--quick)
"$py" launch/bench_gpu.py "${args[@]}"
# Stable Diffusion's UNet (SD 1.5 layout, random weights) and one DRC latent restoration step,
# drc_jax against diffusers, latents 32x32, batch 4 (tiny layout with QUICK=1)
sd_layout=sd15
[[ ${QUICK:-0} == 1 ]] && sd_layout=tiny
"$py" launch/bench_sd.py --layout="$sd_layout" --batch=4 --latent=32 | tee "$out/sd_bench.json" \
  || echo "bench_sd: skipped (torch and diffusers do not import here)" >&2
