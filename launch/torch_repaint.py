"""diffusers' RePaintPipeline on the paper UNet, on the GPU when there is one: the peer's side of
``launch/bench_gpu.py``.

The UNet is built by the peer's ``build_unet`` (``launch/peer/diffusers_repaint.py``), in float32
or bfloat16, on CUDA if available; the
mask and the work are the peer's (a centre mask, 50 respaced steps, jumps 10 x 2 by default).
Prints one JSON line: images/s, model calls per image, device.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--steps', type=int, default=50)
  p.add_argument('--jump-length', type=int, default=10)
  p.add_argument('--jump-n-sample', type=int, default=2)
  p.add_argument('--repeats', type=int, default=2)
  a = p.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import RePaintScheduler  # pylint: disable=import-outside-toplevel
  from diffusers.pipelines.deprecated.repaint.pipeline_repaint import (  # pylint: disable=import-outside-toplevel
    RePaintPipeline,
  )

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peer'))
  from diffusers_repaint import build_unet  # pylint: disable=import-outside-toplevel

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  # The paper UNet (configs/cifar10.py): ch 128, (1, 2, 2, 2), 2 blocks, attention at 16, 32x32x3.
  # bfloat16 as drc_jax's model.dtype: float32 weights and pipeline, the UNet's convolutions and
  # matmuls in bfloat16 (torch.autocast; a bfloat16 UNet stops RePaintPipeline's numpy output).
  unet = build_unet(128, [1, 2, 2, 2], 32, 3, {16}, 2).to(device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=a.dtype == 'bfloat16')
  calls = {'n': 0}
  forward = unet.forward

  def counting_forward(*args, **kw):
    calls['n'] += 1
    return forward(*args, **kw)

  unet.forward = counting_forward
  pipe = RePaintPipeline(
    unet=unet, scheduler=RePaintScheduler(num_train_timesteps=1000, beta_schedule='linear')
  )
  pipe.set_progress_bar_config(disable=True)
  img = (torch.rand(a.batch, 3, 32, 32) * 2 - 1).to(device=device)
  mask = torch.ones(a.batch, 1, 32, 32, device=device)
  mask[:, :, 8:24, 8:24] = 0

  def run():
    with torch.no_grad(), autocast:
      pipe(
        image=img,
        mask_image=mask,
        num_inference_steps=a.steps,
        jump_length=a.jump_length,
        jump_n_sample=a.jump_n_sample,
        generator=torch.Generator(device=device).manual_seed(0),
        output_type='np',
      )
    if device == 'cuda':
      torch.cuda.synchronize()

  run()  # warm-up
  calls['n'] = 0
  t0 = time.perf_counter()
  for _ in range(a.repeats):
    run()
  dt = (time.perf_counter() - t0) / a.repeats
  name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  print(
    json.dumps(
      {
        'impl': 'diffusers RePaintPipeline',
        'torch': torch.__version__,
        'device': name,
        'dtype': a.dtype,
        'batch': a.batch,
        'nfe_per_image': calls['n'] / a.repeats,
        'seconds': round(dt, 4),
        'images_per_s': round(a.batch / dt, 4),
      }
    )
  )


if __name__ == '__main__':
  main()
