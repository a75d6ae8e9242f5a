"""Latent diffusion import check on a configuration the tests do not use: a random diffusers
LDMPipeline saved to disk, converted by the command line, compared through ``load_target(W)``.

  python launch/verify_ldm.py            # needs the torch extra

Prints encode / decode / apply errors, max |ours - diffusers| / max(1, max |diffusers|) (absolute
where the values are within [-1, 1], relative to the largest value otherwise), and exits 1 if any
is above 1e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import diffusers
import numpy as np
import torch

from drc_jax import load_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQ = dict(  # three levels (factor 4), attention in the second, 4-channel latents, 128 codes
  block_out_channels=(32, 64, 64),
  down_block_types=('DownEncoderBlock2D', 'AttnDownEncoderBlock2D', 'DownEncoderBlock2D'),
  up_block_types=('UpDecoderBlock2D', 'AttnUpDecoderBlock2D', 'UpDecoderBlock2D'),
  layers_per_block=1,
  latent_channels=4,
  vq_embed_dim=4,
  num_vq_embeddings=128,
  norm_num_groups=16,
  scaling_factor=0.7,
)
UNET = dict(  # 16x16x4 latents, three levels, 16 channels per head, attention at 8 and 4
  sample_size=16,
  in_channels=4,
  out_channels=4,
  block_out_channels=(32, 64, 96),
  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
  up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  attention_head_dim=16,
  layers_per_block=1,
  norm_num_groups=16,
)


def perturb(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return module.eval()


def err(ours, want):
  ours, want = np.asarray(ours), want.permute(0, 2, 3, 1).numpy()
  return float(np.abs(ours - want).max() / max(1.0, np.abs(want).max()))


def main():
  torch.manual_seed(0)
  vq = perturb(diffusers.VQModel(**VQ), 1)
  with torch.no_grad():
    vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(2))
  unet = perturb(diffusers.UNet2DModel(**UNET), 3)
  sched = diffusers.DDIMScheduler(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0195,
    beta_schedule='scaled_linear',
    clip_sample=False,
  )
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32))
  z = torch.from_numpy(rng.normal(0, 1, (2, 4, 16, 16)).astype(np.float32))
  t = torch.tensor([3, 700])
  with tempfile.TemporaryDirectory() as tmp:
    diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=sched).save_pretrained(f'{tmp}/pipe')
    subprocess.run(
      [
        sys.executable,
        '-m',
        'drc_jax.convert',
        '--format=diffusers-ldm',
        f'--src={tmp}/pipe',
        f'--workdir={tmp}/w',
      ],
      check=True,
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    target = load_target(f'{tmp}/w')
    nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
      lat = vq.encode(x).latents
      errs = {
        'encode': err(target.encode(nhwc(x)), lat),
        'decode': err(target.decode(nhwc(lat)), vq.decode(lat).sample),
        'apply': err(target.apply(nhwc(z), t.numpy()), unet(z, t).sample),
      }
  print(
    f'latent shape {target.latent_shape}, image shape {target.image_shape}, '
    f'scaling factor {target.scaling_factor}'
  )
  for name, e in errs.items():
    print(f'{name:7s} {e:.2e}')
  worst = max(errs.values())
  print(f'worst {worst:.2e} (bar 1e-4): {"OK" if worst <= 1e-4 else "FAILED"}')
  return 0 if worst <= 1e-4 else 1


if __name__ == '__main__':
  sys.exit(main())
