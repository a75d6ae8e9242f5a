"""The PyTorch side of the train-step comparison: one DDPM training step of the same UNet layout.

A diffusers UNet2DModel built by ``launch/peer/diffusers_repaint.py`` (the layout drc_jax's UNet
computes),
epsilon-prediction MSE at uniform t on a random batch, backward, gradient clipping at 1, Adam and
an EMA update: what ``drc_jax.targets.train`` does per step. Prints one JSON line with seconds per
step.
Run it with ``bash launch/bench_train_vs_peer.sh`` (in the peer's environment, launch/peer/run.sh).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

# untimed steps before the timed ones (drc_jax.analysis.bench --train_step: its compiling step and
# TRAIN_WARMUP = 2 more)
WARMUP = 2


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--ch', type=int, default=32)
  p.add_argument('--ch-mult', default='1,2,2')
  p.add_argument('--num-res-blocks', type=int, default=1)
  p.add_argument('--attn-res', default='8')
  p.add_argument('--res', type=int, default=16)
  p.add_argument('--channels', type=int, default=1)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--dropout', type=float, default=0.1)
  p.add_argument('--repeats', type=int, default=20)
  a = p.parse_args()
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peer'))
  from diffusers_repaint import build_unet  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  unet = build_unet(
    a.ch,
    [int(m) for m in a.ch_mult.split(',')],
    a.res,
    a.channels,
    {int(r) for r in a.attn_res.split(',') if r},
    a.num_res_blocks,
  )
  for m in unet.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = a.dropout
  unet.train()
  ema = [q.detach().clone() for q in unet.parameters()]
  opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
  betas = torch.linspace(1e-4, 0.02, 1000)
  abar = torch.cumprod(1 - betas, 0)
  x0 = torch.rand(a.batch, a.channels, a.res, a.res) * 2 - 1

  def step():
    t = torch.randint(0, 1000, (a.batch,))
    eps = torch.randn_like(x0)
    ab = abar[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    loss = torch.mean((unet(xt, t).sample - eps) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(unet.parameters()), 1 - 0.999)
    return float(loss)

  for _ in range(WARMUP):
    step()
  times = []
  for _ in range(
    a.repeats
  ):  # each step timed alone; the median, as drc_jax.analysis.bench --train_step
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  print(
    json.dumps(
      {
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'batch': a.batch,
        'params_m': round(sum(q.numel() for q in unet.parameters()) / 1e6, 3),
        'seconds_per_step': round(dt, 4),
        'steps_per_s': round(1 / dt, 3),
        'seconds_per_step_min': round(min(times), 4),
        'timed_steps': a.repeats,
        'pid': os.getpid(),
      }
    )
  )


if __name__ == '__main__':
  main()
