"""The embedded default: a real membership audit on Fashion-MNIST that runs on a laptop CPU.

Choices, made once on principle and not tuned for any attack:
* Each member must be seen hundreds of times, as published targets see theirs (the CIFAR10
  target of SecMI/PIA sees each of its 25,000 members about 4,000 times); the whole first run
  must fit in 15 minutes on a 2-core laptop, which allows 1,000 train steps of batch 64 for a
  1M-parameter UNet at 16x16 (64,000 samples). The rule: every member seen 500 times, hence 128
  members. Non-members cost no training, so there are 1,000 of them: TPR at 1% FPR then rests on
  10 false positives (ASR and the calibrated threshold use balanced accuracy, so the unequal
  sets do not reward a trivial rule).
* A 1.1M-parameter DDPM UNet (ch 32, ch_mult (1, 2, 2), one block per level, attention at 8x8)
  on 16x16 grayscale images, dropout 0.1, random flips, EMA 0.999: the paper recipe, shrunk.
* Attack hyper-parameters are the papers' (t = 200 for Loss and PIA, SecMI t = 100, k = 10).
* DRC restores with deterministic DDIM inpainting from t_start = 500 in 10 steps, K = 4
  restorations per image (different keys), masked MSE on the removed centre box (rho = 0.5).

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

  c.split.num_members = 128
  c.split.num_nonmembers = 1000

  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_res = (8,)
  c.model.dropout = 0.1

  c.train.steps = 1000
  c.train.batch_size = 64
  c.train.lr = 2e-4
  c.train.warmup_steps = 200
  c.train.ema_decay = 0.999
  c.train.log_every = 100
  c.train.checkpoint_every = 500

  c.drc.restorer = 'ddim'
  c.drc.t_start = 500
  c.drc.steps = 10
  c.drc.num_restorations = 4

  c.audit.batch_size = 64
  c.audit.shard_size = 256
  if a.runlocal:
    config_base.apply_runlocal(c)
  return c
