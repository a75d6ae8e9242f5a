"""The embedded default: a real membership audit on Fashion-MNIST that runs on a laptop CPU.

Choices, made once on principle and not tuned for any attack:
* 1,000 members and 1,000 non-members drawn from the 60,000 training images (seed 0): enough
  images that TPR at 1% FPR rests on 10 false positives, few enough to score on a CPU.
* A 1M-parameter DDPM UNet at 16x16 (grayscale), trained on the members only for 3,000 steps
  of batch 64 (about 190 epochs): a target that has seen each member many times, as published
  targets have (the CIFAR10 target saw each member about 4,000 times), but far from memorising.
* Attack hyper-parameters are the papers' (t = 200 for Loss and PIA, SecMI t = 100, k = 10).
* DRC restores with DDIM inpainting from t_start = 500 in 20 steps, 4 restorations per image,
  comparing masked MSE on the removed centre box (rho = 0.5).

Variants: ``:runlocal`` shrinks to a CPU smoke run of seconds.
"""

from drc_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, runlocal=False)
  c = config_base.base_config()
  c.data.source = 'fashion_mnist'
  c.data.name = 'fashion_mnist'
  c.data.split = 'train'
  c.data.resolution = 16
  c.data.channels = 1

  c.split.num_members = 1000
  c.split.num_nonmembers = 1000

  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_res = (8,)
  c.model.dropout = 0.1

  c.train.steps = 3000
  c.train.batch_size = 64
  c.train.lr = 2e-4
  c.train.warmup_steps = 200
  c.train.ema_decay = 0.999
  c.train.log_every = 100
  c.train.checkpoint_every = 500

  c.drc.restorer = 'ddim'
  c.drc.t_start = 500
  c.drc.steps = 20
  c.drc.num_restorations = 4

  c.audit.batch_size = 100
  c.audit.shard_size = 500
  if a.runlocal:
    config_base.apply_runlocal(c)
  return c
