"""GPU figures for the README in one run: the paper UNet's forward and RePaint, f32 and bf16.

  python launch/bench_gpu.py --out=DIR            # on a GPU host (launch/bench_gpu.sh runs it)
  python launch/bench_gpu.py --quick --out=DIR    # a few seconds on any backend: checks the script

For the paper UNet (configs/cifar10.py: 35.7M parameters, 32x32x3) at batch 64 and 256, in float32
and bfloat16 (``config.model.dtype``): the jitted forward's images/s and achieved TFLOP/s
(``python -m drc_jax.analysis bench --forward_only``: FLOPs from XLA's cost analysis of the
program), the
fraction of the device's dense peak for that dtype (float32 against the TF32 peak: JAX's default
precision lets XLA use TF32 on the GPU), and RePaint's images/s (50 respaced steps, jumps 10 x 2:
90 model calls per image, as launch/peer). Then diffusers' RePaintPipeline on the same device
and UNet layout (``launch/torch_repaint.py``, when torch and diffusers import). Writes
``gpu_bench.json`` and ``gpu_bench.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax

from drc_jax.analysis import bench
from drc_jax.core import config_base

# Dense peak TFLOP/s (no sparsity) by device name: bfloat16 and TF32 tensor cores, from NVIDIA's
# data sheets (SXM parts; the H200 has the H100's compute).
PEAKS = {
  'H200': {'bfloat16': 989.4, 'float32': 494.7},
  'H100': {'bfloat16': 989.4, 'float32': 494.7},
  'A100': {'bfloat16': 312.0, 'float32': 156.0},
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAKS.items():
    if name in device_kind:
      return peaks[dtype]
  return None


def load_config(dtype: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'cifar10.py')
  config = config_base.sibling(path, 'cifar10').get_config()
  with config.unlocked():
    config.model.dtype = dtype
  return config


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--out', required=True)
  p.add_argument('--quick', action='store_true', help='Tiny batches and steps: a script check.')
  p.add_argument('--no_peer', action='store_true', help="Skip diffusers' RePaintPipeline.")
  args = p.parse_args()
  quick = args.quick
  batches = (2, 4) if quick else (64, 256)
  steps, jump_length, jump_n_sample = (4, 2, 2) if quick else (50, 10, 2)
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', str(device))
  rows = []
  for dtype in ('float32', 'bfloat16'):
    config = load_config(dtype)
    for batch in batches:
      fwd = bench.run_bench(config, 'repaint', batch, 0, 0, 0, 3 if quick else 20, True)
      tflops = fwd['gflop_per_s'] / 1e3
      rep = bench.run_bench(
        config, 'repaint', batch, steps, jump_length, jump_n_sample, 1 if quick else 2, False
      )
      peak = peak_tflops(kind, dtype)
      rows.append(
        {
          'impl': 'drc_jax',
          'dtype': dtype,
          'batch': batch,
          'forward_images_per_s': fwd['images_per_s'],
          'forward_ms': 1e3 * batch / fwd['images_per_s'],
          'gflop_per_call': fwd['gflop_per_call'],
          'tflops': tflops,
          'peak_tflops': peak,
          'fraction_of_peak': tflops / peak if peak else None,
          'repaint_images_per_s': rep['images_per_s'],
          'repaint_nfe_per_image': rep['nfe_per_image'],
          'params_m': rep['params_m'],
        }
      )
      print(json.dumps(rows[-1]), flush=True)
  peer = []
  if not args.no_peer:
    for dtype in ('float32', 'bfloat16'):
      for batch in batches:
        cmd = [
          sys.executable,
          os.path.join(os.path.dirname(__file__), 'torch_repaint.py'),
          f'--dtype={dtype}',
          f'--batch={batch}',
          f'--steps={steps}',
          f'--jump-length={jump_length}',
          f'--jump-n-sample={jump_n_sample}',
          f'--repeats={1 if quick else 2}',
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
          peer.append({'dtype': dtype, 'batch': batch, 'error': done.stderr[-2000:]})
        else:
          peer.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(peer[-1]), flush=True)
  doc = {
    'device': kind,
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'quick': quick,
    'repaint': {'steps': steps, 'jump_length': jump_length, 'jump_n_sample': jump_n_sample},
    'drc_jax': rows,
    'peer': peer,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'gpu_bench.json'), 'w') as f:
    json.dump(doc, f, indent=1)
  table = format_table(doc)
  with open(os.path.join(args.out, 'gpu_bench.md'), 'w') as f:
    f.write(table)
  print(table)


def format_table(doc: dict) -> str:
  peer = {(r['dtype'], r['batch']): r for r in doc['peer'] if 'images_per_s' in r}
  lines = [
    f'Device: {doc["device"]} (JAX {doc["jax"]}, backend {doc["backend"]}); RePaint '
    f'{doc["repaint"]["steps"]} steps, jumps {doc["repaint"]["jump_length"]} x '
    f'{doc["repaint"]["jump_n_sample"]}.',
    '',
    '| dtype | batch | forward images/s | TFLOP/s | of dense peak | RePaint images/s | '
    'diffusers RePaint images/s | ratio |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in doc['drc_jax']:
    frac = f'{100 * r["fraction_of_peak"]:.1f}%' if r['fraction_of_peak'] else 'n/a'
    q = peer.get((r['dtype'], r['batch']))
    theirs = f'{q["images_per_s"]:.2f}' if q else 'n/a'
    ratio = f'{r["repaint_images_per_s"] / q["images_per_s"]:.2f}x' if q else 'n/a'
    lines.append(
      f'| {r["dtype"]} | {r["batch"]} | {r["forward_images_per_s"]:.1f} | {r["tflops"]:.2f} | '
      f'{frac} | {r["repaint_images_per_s"]:.2f} | {theirs} | {ratio} |'
    )
  for r in doc['peer']:
    if 'error' in r:
      lines.append(f'\ndiffusers failed at {r["dtype"]}, batch {r["batch"]}: {r["error"][-300:]}')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
