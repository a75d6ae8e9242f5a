"""A text-conditioned membership audit on Fashion-MNIST: a target trained here on captioned members.

The target is a Stable Diffusion-style model at CPU scale, trained by this config (``--mode=all``
trains it in the workdir, then audits it; ``targets/train_text.py``): a UNet with cross-attention
on the 16x16 grayscale images themselves (pixel space, no autoencoder), conditioned on each
image's caption through a frozen, randomly initialised CLIP text tower with a BPE tokenizer
learned from the ten class captions. Choices, made before any audit of the target:

* Data and split: the embedded default's (``configs/fashion_mnist.py``): 256 members from the
  Fashion-MNIST train split, 1,000 non-members, 16x16 grayscale, the same seed.
* Captions: each image's class as ``'a photo of a {}'`` ('a photo of a sneaker', 'a photo of a
  t-shirt/top', ...), replaced by the empty caption for 10% of the training examples
  (``text.caption_dropout``: classifier-free guidance training, as Stable Diffusion's fine-tunes).
  Members and non-members are captioned the same way, so the captions carry no membership.
* Model (``train_text.default_text_model``): UNet channels (32, 64), one ResNet per level, a
  cross-attention transformer (2 heads) at 8x8; text tower width 64, 2 layers, 16 tokens.
  About 1.0M UNet parameters, as the embedded default's 1.1M DDPM UNet.
* Training: the embedded default's: 8,000 steps of batch 64 (2,000 epochs per member; about 30
  minutes on a 2-core CPU), learning rate 1e-3, 200 warm-up steps, EMA 0.999, random flips;
  T = 1,000 linear betas.
* Attacks: every one with a text-conditional version, each under the image's own caption without
  guidance (``text.attack_guidance_scale`` 1): DRC, Loss, SecMI, PIA, PIAN, SimA, ReDiffuse, and
  CLiD at its authors' code defaults (t = 440, 450, 460; the caption's character thirds and the
  empty caption as the weakened conditions). Attack hyper-parameters are the papers' (as
  ``configs/fashion_mnist.py``).
* DRC: the embedded default's protocol, not re-tuned for this target: RePaint over 50 steps with
  jumps of 10 x 2, random 4x4 patches covering 25% of the image removed, K = 2 restorations,
  masked MSE, under the caption (``text.guidance_scale`` 1: the model's conditional prediction).

Variants: ``:runlocal`` trains a tiny text target for 20 steps on 32 + 32 images and audits it
with every attack in a few minutes on a CPU (its figures mean nothing); ``guidance=S`` restores
DRC's images with classifier-free guidance S. Variants combine with commas.
"""

from drc_jax.core import config_base
from drc_jax.data import sources
from drc_jax.targets import train_text


def get_config(arg=None):
  a = config_base.parse_arg(arg, runlocal=False, guidance=1.0)
  c = config_base.base_config()
  c.data.resolution = 16
  c.data.channels = 1

  c.split.num_members = 256
  c.split.num_nonmembers = 1000

  c.text.captions = 'class_template'
  c.text.template = 'a photo of a {}'
  c.text.caption_dropout = 0.1
  c.text.guidance_scale = float(a.guidance)
  corpus = ', '.join(c.text.template.format(n.lower()) for n in sources.FASHION_MNIST_CLASSES)
  c.text_model = train_text.default_text_model(corpus)

  c.train.steps = 8000
  c.train.batch_size = 64
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.ema_decay = 0.999
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3

  c.attacks.names = 'drc,loss,secmi,pia,pian,sima,rediffuse,clid'

  # DRC: configs/fashion_mnist.py's protocol (docstring)
  c.drc.restorer = 'repaint'
  c.drc.jump_n_sample = 2
  c.drc.mask = 'random_patches'
  c.drc.mask_ratio = 0.25
  c.drc.num_restorations = 2

  c.audit.shard_size = 256
  c.audit.checkpoint = ''  # the target trained in the workdir
  if a.runlocal:
    config_base.apply_runlocal(c)
    m = c.text_model
    m.block_out_channels, m.norm_num_groups = (16, 32), 8
    m.text_hidden_size, m.text_layers, m.text_intermediate_size = 16, 1, 32
    m.text_max_length, m.tokenizer_merges = 12, 60
    c.attacks.secmi_t, c.attacks.secmi_k = 100, 50  # 3 model calls: a smoke run
    c.attacks.rediffuse_n = 2
  return c
