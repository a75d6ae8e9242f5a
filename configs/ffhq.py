"""FFHQ membership audit of the public latent diffusion model (the DRC paper's FFHQ row).

Choices, the published ones where one exists and not tuned for any attack:
* Target: CompVis's ``ffhq-ldm-vq-4`` (a VQ autoencoder with downsampling factor 4 and a 64x64x3
  latent, 256x256 images; the UNet on the latents, scaled-linear betas 0.0015..0.0195, T = 1000),
  converted into the workdir or named by ``--config.audit.checkpoint`` (README, "Reproducing the
  FFHQ row"). The audit never trains: ``mode`` is 'audit'.
* Data: the FFHQ images at 256x256 from an image folder (``--config.data.data_dir``; files in
  name order, ``00000.png`` .. ``69999.png``). CompVis trained on the first 60,000 (their
  ``ffhqtrain.txt``) and held out the last 10,000 (``ffhqvalidation.txt``), so members are drawn
  from indices 0..59,999 and non-members from 60,000..69,999 (``split.member_range`` /
  ``nonmember_range``; a random split over all 70,000 would call held-out images members):
  1,000 of each, seeded. ``config.split.file`` may name another split.
* Attacks in their latent-diffusion versions: the baselines score the image's latents (scaled by
  the autoencoder's factor); DRC degrades and compares in pixel space and restores on the
  latents (the mask carried to the latent grid, the restoration decoded).
* DRC: the paper's faces protocol as for CelebA: the centre box holding half the image removed,
  deterministic DDIM inpainting from pure noise in 200 steps (the paper's restorer), K = 4, masked
  MSE. ``:paper`` uses the paper's semantic steps instead (MTCNN face box, face-ID cosine, the
  agree number; README, "Encoders").

Variants: ``:runlocal`` audits a tiny random latent target (``random:ldm-tiny``: 32x32x3 images,
8x8x3 latents) on 32 + 32 real Fashion-MNIST images as RGB, every attack, in seconds; a smoke run
of every latent code path, not a measurement. ``:paper`` (with ``runlocal``: random encoders).
"""

from drc_jax.core import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, runlocal=False, paper=False, mask='face')
  c = config_base.base_config()
  c.mode = 'audit'
  c.data.source = 'folder'
  c.data.name = 'ffhq'
  c.data.resolution = 256
  c.split.num_members = 1000
  c.split.num_nonmembers = 1000
  c.split.member_range = '0:60000'
  c.split.nonmember_range = '60000:70000'
  c.diffusion.beta_schedule = 'scaled_linear'  # the target's own schedule is what the audit uses
  c.diffusion.beta_start = 0.0015
  c.diffusion.beta_end = 0.0195
  config_base.set_paper_drc(c)
  c.audit.batch_size = 16  # 256x256 images, latents of 64x64x3
  c.audit.shard_size = 256
  if a.runlocal:
    config_base.apply_runlocal(c)
    c.data.source = 'fashion_mnist'
    c.data.name = 'fashion_mnist'
    c.data.resolution = 32
    c.data.convert_channels = True  # gray Fashion-MNIST as RGB for the RGB autoencoder
    c.split.member_range = c.split.nonmember_range = ''
    c.audit.checkpoint = 'random:ldm-tiny'
    c.drc.steps = 4
  if a.paper:
    config_base.set_paper_semantic_drc(c, a.mask, a.runlocal, 'random:facenet')
  return c
