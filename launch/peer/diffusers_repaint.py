"""drc_jax's PyTorch peer: diffusers' RePaintPipeline on the same UNet layout and the same work.

Builds a randomly initialised diffusers ``UNet2DModel`` in the layout drc_jax's UNet computes
(pytorch-ddpm / google ddpm-cifar10-32: a residual block per level and resolution, attention at
the ``--attn-res`` resolutions, GroupNorm, sinusoidal time embedding), runs ``RePaintPipeline``
over a batch with a centre mask, and prints one JSON line: images/s, model calls per image,
seconds. ``launch/bench_vs_peer.sh`` runs it beside ``python -m drc_jax.analysis bench`` with the
same layout, batch, steps and jumps; ``launch/torch_train_step.py`` and ``launch/torch_repaint.py``
build their UNet with ``build_unet``. Run it through ``launch/peer/run.sh`` (its environment).
"""

import argparse
import json
import os
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')


def build_unet(ch, ch_mult, res, channels, attn_res, num_res_blocks, dropout=0.0):
  """A diffusers UNet2DModel of drc_jax's layout (``models/unet.py``), random weights."""
  from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel

  levels = [res // 2**i for i in range(len(ch_mult))]  # the resolution of each level
  return UNet2DModel(
    sample_size=res,
    in_channels=channels,
    out_channels=channels,
    layers_per_block=num_res_blocks,
    block_out_channels=tuple(ch * m for m in ch_mult),
    down_block_types=tuple('AttnDownBlock2D' if r in attn_res else 'DownBlock2D' for r in levels),
    up_block_types=tuple(
      'AttnUpBlock2D' if r in attn_res else 'UpBlock2D' for r in reversed(levels)
    ),
    norm_num_groups=min(32, ch),
    norm_eps=1e-6,
    act_fn='silu',
    attention_head_dim=None,  # one head, as drc_jax's pixel targets
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    time_embedding_type='positional',
    dropout=dropout,
  ).eval()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--ch', type=int, default=128)
  p.add_argument('--ch-mult', default='1,2,2,2')
  p.add_argument('--num-res-blocks', type=int, default=2)
  p.add_argument('--attn-res', default='16', help='comma list of resolutions with attention')
  p.add_argument('--res', type=int, default=32)
  p.add_argument('--channels', type=int, default=3)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=50, help='RePaint respaced steps')
  p.add_argument('--jump-length', type=int, default=10)
  p.add_argument('--jump-n-sample', type=int, default=2)
  p.add_argument('--repeats', type=int, default=2, help='timed runs after one untimed run')
  a = p.parse_args()

  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import RePaintScheduler  # pylint: disable=import-outside-toplevel
  from diffusers.pipelines.deprecated.repaint.pipeline_repaint import (  # pylint: disable=import-outside-toplevel
    RePaintPipeline,
  )

  torch.manual_seed(0)
  unet = build_unet(
    a.ch,
    [int(m) for m in a.ch_mult.split(',')],
    a.res,
    a.channels,
    {int(r) for r in a.attn_res.split(',') if r},
    a.num_res_blocks,
  )
  calls = [0]
  forward = unet.forward

  def counted(*args, **kw):
    calls[0] += 1
    return forward(*args, **kw)

  unet.forward = counted
  pipe = RePaintPipeline(
    unet=unet, scheduler=RePaintScheduler(num_train_timesteps=1000, beta_schedule='linear')
  )
  pipe.set_progress_bar_config(disable=True)
  images = torch.rand(a.batch, a.channels, a.res, a.res) * 2 - 1
  mask = torch.ones(a.batch, 1, a.res, a.res)  # 1 = known; the centre half of each side unknown
  q = a.res // 4
  mask[:, :, q : a.res - q, q : a.res - q] = 0

  def restore():
    with torch.no_grad():
      pipe(
        image=images,
        mask_image=mask,
        num_inference_steps=a.steps,
        jump_length=a.jump_length,
        jump_n_sample=a.jump_n_sample,
        generator=torch.Generator().manual_seed(0),
        output_type='np',
      )

  restore()  # untimed: allocations and lazy initialisation
  calls[0] = 0
  t0 = time.perf_counter()
  for _ in range(a.repeats):
    restore()
  seconds = (time.perf_counter() - t0) / a.repeats
  nfe = calls[0] / a.repeats  # model calls per image: each call restores the whole batch
  print(
    json.dumps(
      {
        'peer': 'diffusers RePaintPipeline',
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'batch': a.batch,
        'res': a.res,
        'params_m': round(sum(p.numel() for p in unet.parameters()) / 1e6, 3),
        'nfe_per_image': nfe,
        'seconds': round(seconds, 3),
        'images_per_s': round(a.batch / seconds, 4),
        'model_calls_per_s': round(nfe / seconds, 3),
      }
    )
  )


if __name__ == '__main__':
  main()
