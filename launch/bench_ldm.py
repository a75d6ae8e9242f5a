"""Memory and speed of the paper-size latent diffusion target (CompVis ffhq-ldm-vq-4) on this host.

  python launch/bench_ldm.py                         # random weights in the ffhq-ldm-vq-4 layout
  python launch/bench_ldm.py --workdir=runs/ffhq_ldm # a converted target (--format=diffusers-ldm)
  python launch/bench_ldm.py --batches=1,4,16 --repeats=3

Prints one JSON line per batch size with, for ``encode`` (256x256x3 -> 64x64x3), ``decode``
(quantise, then 64x64x3 -> 256x256x3) and one UNet call on 64x64x3 latents: the compile time, the
median seconds per call over ``--repeats`` timed calls after the compile, images per second and
the GFLOPs XLA counts per call; then parameter bytes and the peak RSS of the process. Weights are
random unless --workdir is given: speed does not depend on them. One device (the first); the
audit's sharded programs are measured by ``python -m drc_jax.analysis bench``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drc_jax import load_target  # noqa: E402  (the repository root goes on sys.path first)
from drc_jax.convert import diffusers as diffusers_lib  # noqa: E402
from drc_jax.convert import diffusers_ldm  # noqa: E402
from drc_jax.models import unet as unet_lib  # noqa: E402
from drc_jax.models import vq as vq_lib  # noqa: E402

flags.DEFINE_string('workdir', None, 'A converted latent target; default: random weights.')
flags.DEFINE_list('batches', ['1', '4'], 'Batch sizes to time.')
flags.DEFINE_integer('repeats', 2, 'Timed calls after the compile call (the median is printed).')

# configs/latent-diffusion/ffhq-ldm-vq-4.yaml of CompVis/latent-diffusion, as the diffusers import
# reads it (diffusers_ldm.FFHQ_LDM_VQ4; tests/convert/test_ldm.py checks it against diffusers).
FFHQ_UNET = diffusers_lib.diffusers_config(diffusers_ldm.FFHQ_LDM_VQ4['unet'])
FFHQ_VQ = diffusers_ldm.vq_config(diffusers_ldm.FFHQ_LDM_VQ4['vq'])[0]


def _nbytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def _models():
  """(unet apply, unet params, autoencoder, autoencoder params, source)."""
  if flags.FLAGS.workdir:
    target = load_target(flags.FLAGS.workdir)
    if not target.is_latent:
      raise app.UsageError(f'{flags.FLAGS.workdir} is not a latent diffusion target')
    return (
      target.model,
      target.params,
      target.autoencoder,
      target.autoencoder_params,
      flags.FLAGS.workdir,
    )
  unet, unet_params = unet_lib.DiffusionModel.create(FFHQ_UNET, seed=0)
  vq, vq_params = vq_lib.Autoencoder.create(FFHQ_VQ, seed=0)
  return unet, unet_params, vq, vq_params, 'random ffhq-ldm-vq-4 layout'


def _time(fn, *args, repeats: int) -> dict:
  """Compile time, median steady-state seconds and XLA's GFLOPs of ``jax.jit(fn)(*args)``."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # the first call
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get('flops')
  return {
    'compile_s': round(compile_s, 2),
    'seconds': round(statistics.median(times), 3),
    'gflops': None if flops is None else round(flops / 1e9, 1),
  }


def main(argv):
  del argv
  unet, unet_params, vq, vq_params, source = _models()
  device = jax.devices()[0]
  unet_params, vq_params = jax.device_put((unet_params, vq_params), device)
  h, w, c = FFHQ_UNET.resolution, FFHQ_UNET.resolution, FFHQ_UNET.in_channels
  if flags.FLAGS.workdir:
    h, w, c = (unet.config.resolution, unet.config.resolution, unet.config.in_channels)
  f = vq.config.downsampling_factor
  rng = np.random.default_rng(0)
  for batch in (int(b) for b in flags.FLAGS.batches):
    x = jnp.asarray(rng.uniform(-1, 1, (batch, h * f, w * f, vq.config.in_channels)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)
    r = flags.FLAGS.repeats
    row = {
      'batch': batch,
      'encode': _time(vq.encode, vq_params, x, repeats=r),
      'decode': _time(vq.decode, vq_params, z, repeats=r),
      'unet': _time(unet.apply, unet_params, z, t, repeats=r),
    }
    for part in ('encode', 'decode', 'unet'):
      row[part]['images_per_s'] = round(batch / row[part]['seconds'], 2)
    row.update(
      source=source,
      device=f'{device.platform}:{device.device_kind}',
      cpu_count=os.cpu_count(),
      unet_param_bytes=_nbytes(unet_params),
      vq_param_bytes=_nbytes(vq_params),
      unet_params_m=round(unet_lib.count_params(unet_params) / 1e6, 2),
      vq_params_m=round(unet_lib.count_params(vq_params) / 1e6, 2),
      peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
