"""Stable Diffusion's UNet and one DRC restoration step: drc_jax against diffusers, side by side.

  python launch/bench_sd.py                      # SD 1.5's UNet layout, random weights
  python launch/bench_sd.py --layout=tiny         # a tiny UNet: a check that the script runs
  python launch/bench_sd.py --batch=4 --latent=32 --repeats=5

A random diffusers ``UNet2DConditionModel`` in the chosen layout (``sd15``: SD 1.5's
``unet/config.json``, 860M parameters; ``sd2``: SD 2.x's, linear projections and per-block heads;
speed does not depend on the weights) is saved, imported with drc_jax's converter
(``convert/sd_unet.py``), and both are timed on the same inputs: latents ``[B, latent, latent,
4]``, timesteps, a text context ``[B, 77, cross_attention_dim]``. Two programs each:

* ``forward``: one UNet call (diffusers: ``unet(z, t, context).sample`` under ``torch.no_grad``;
  drc_jax: the jitted pure ``apply``);
* ``restoration step``: one RePaint-style latent inpainting step of DRC, the UNet call, the DDPM
  posterior mean from the epsilon prediction, fresh noise, and the known region pasted back at
  the step's noise level (the same arithmetic written once in torch and once in JAX).

The timed calls alternate between the two libraries (``--repeats`` rounds after one untimed
call each), so a busy machine slows both alike; the median seconds of each and their ratio are
printed as one JSON line, with the largest difference between the two UNet outputs. Torch runs on
CUDA when it has a GPU, else on the CPU with its default threads; JAX on its first device.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drc_jax.convert import sd_unet  # noqa: E402  (the repository root goes on sys.path first)
from drc_jax.core import schedule as schedule_lib  # noqa: E402
from drc_jax.models import unet_cond  # noqa: E402

flags.DEFINE_enum('layout', 'sd15', ['sd15', 'sd2', 'tiny'], 'UNet layout (random weights).')
flags.DEFINE_integer('batch', 4, 'Images per call.')
flags.DEFINE_integer('latent', 32, 'Latent side (images of 8x that side).')
flags.DEFINE_integer('repeats', 5, 'Timed rounds after one untimed call of each program.')
F = flags.FLAGS

_SD = dict(
  sample_size=64,
  in_channels=4,
  out_channels=4,
  down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
  up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  norm_num_groups=32,
)
LAYOUTS = {
  'sd15': dict(_SD, cross_attention_dim=768, attention_head_dim=8),
  'sd2': dict(
    _SD,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
  ),
  'tiny': dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
  ),
}


def _timed(fn, sync) -> float:
  start = time.perf_counter()
  sync(fn())
  return time.perf_counter() - start


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  cfg = LAYOUTS[F.layout]
  unet = UNet2DConditionModel(**cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    unet.save_pretrained(tmp)
    config, params = sd_unet.convert_unet_cond(tmp)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'  # beside JAX's first device
  unet = unet.to(dev)
  apply = unet_cond.abstract_model(config)[0].apply

  b, s, d = F.batch, F.latent, cfg['cross_attention_dim']
  rng = np.random.default_rng(0)
  z = rng.normal(size=(b, s, s, 4)).astype(np.float32)  # [B, h, w, 4]
  ctx = rng.normal(size=(b, 77, d)).astype(np.float32)
  known = rng.normal(size=(b, s, s, 4)).astype(np.float32)  # the image's latents
  keep = (rng.random((b, s, s, 1)) < 0.75).astype(np.float32)  # 1 = known
  t = 500
  sched = schedule_lib.make_schedule(  # SD's scaled_linear betas
    {
      'beta_schedule': 'scaled_linear',
      'beta_start': 0.00085,
      'beta_end': 0.012,
      'num_timesteps': 1000,
    }
  )
  ab, ab_prev = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 1])
  beta = 1.0 - ab / ab_prev
  coef_x0 = np.sqrt(ab_prev) * beta / (1 - ab)
  coef_xt = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
  sigma = np.sqrt(beta * (1 - ab_prev) / (1 - ab))

  # drc_jax
  jp = jax.device_put(params)
  jz, jctx, jknown, jkeep = map(jnp.asarray, (z, ctx, known, keep))
  jt = jnp.full((b,), t, jnp.int32)
  fwd_j = jax.jit(lambda p, x, c: apply(p, x, jt, c))

  def step_fn(p, x, c, key):
    eps = apply(p, x, jt, c)
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    k1, k2 = jax.random.split(key)
    prev = coef_x0 * x0 + coef_xt * x + sigma * jax.random.normal(k1, x.shape)
    known_prev = np.sqrt(ab_prev) * jknown + np.sqrt(1 - ab_prev) * jax.random.normal(k2, x.shape)
    return jkeep * known_prev + (1 - jkeep) * prev

  step_j = jax.jit(step_fn)
  key = jax.random.key(0)

  # diffusers (NCHW)
  tz = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(dev)
  tctx = torch.from_numpy(ctx).to(dev)
  tknown = torch.from_numpy(known.transpose(0, 3, 1, 2).copy()).to(dev)
  tkeep = torch.from_numpy(keep.transpose(0, 3, 1, 2).copy()).to(dev)
  tt = torch.full((b,), t, dtype=torch.long, device=dev)

  def fwd_t():
    with torch.no_grad():
      return unet(tz, tt, tctx).sample

  def step_t():
    with torch.no_grad():
      eps = unet(tz, tt, tctx).sample
      x0 = (tz - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
      prev = coef_x0 * x0 + coef_xt * tz + sigma * torch.randn_like(tz)
      known_prev = np.sqrt(ab_prev) * tknown + np.sqrt(1 - ab_prev) * torch.randn_like(tz)
      return tkeep * known_prev + (1 - tkeep) * prev

  jsync = jax.block_until_ready
  tsync = lambda x: torch.cuda.synchronize() if dev == 'cuda' else x  # CPU ops are synchronous

  compile_s = _timed(lambda: fwd_j(jp, jz, jctx), jsync)
  compile_s += _timed(lambda: step_j(jp, jz, jctx, key), jsync)
  out_j = np.asarray(fwd_j(jp, jz, jctx))
  out_t = fwd_t().cpu().numpy().transpose(0, 2, 3, 1)
  _timed(fwd_t, tsync), _timed(step_t, tsync)  # warm-up
  times = {k: [] for k in ('forward_jax', 'forward_torch', 'step_jax', 'step_torch')}
  for _ in range(F.repeats):
    times['forward_jax'].append(_timed(lambda: fwd_j(jp, jz, jctx), jsync))
    times['forward_torch'].append(_timed(fwd_t, tsync))
    times['step_jax'].append(_timed(lambda: step_j(jp, jz, jctx, key), jsync))
    times['step_torch'].append(_timed(step_t, tsync))
  med = {k: statistics.median(v) for k, v in times.items()}
  print(
    json.dumps(
      {
        'layout': F.layout,
        'params_millions': round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        'batch': b,
        'latent': s,
        'repeats': F.repeats,
        'jax_compile_s': round(compile_s, 2),
        'median_s': {k: round(v, 4) for k, v in med.items()},
        'forward_speedup_jax_over_torch': round(med['forward_torch'] / med['forward_jax'], 3),
        'step_speedup_jax_over_torch': round(med['step_torch'] / med['step_jax'], 3),
        'max_abs_diff_unet_output': float(np.max(np.abs(out_j - out_t))),
        'torch_device': dev,
        'torch_threads': torch.get_num_threads(),
        'devices': [str(dv) for dv in jax.devices()],
      }
    )
  )


if __name__ == '__main__':
  app.run(main)
