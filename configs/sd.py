"""Stable Diffusion membership audit: was this image (with its caption) in the training set?

The target is a Stable Diffusion pipeline imported once (``python -m drc_jax.convert
--format=diffusers-sd --src=<pipeline folder or Hub repo id> --workdir=runs/sd15``; SD 1.x, 2.x,
fine-tunes, 9-channel inpainting pipelines), audited in its own workdir:

  python -m drc_jax.main --config=configs/sd.py:model=runs/sd15,members=DIR,nonmembers=DIR \\
      --workdir=runs/sd15-audit

Choices:
* Data: two image folders, the members and the non-members, each with a ``captions.jsonl``
  (``{"file": "<relative path>", "text": "<caption>"}`` per line) or a ``.txt`` caption beside each
  image (``data/captions.py``); every attack runs under the image's own caption. The split is
  CopyMark's Stable Diffusion 1.5 setting (Wen et al., "CopyMark", github.com/caradryanl/CopyMark,
  ``scripts/*.sh``: ``--member-dataset laion-aesthetic-2-5k`` ``--holdout-dataset
  coco2017-val-2-5k``): 2,500 LAION-Aesthetics images SD 1.5 was trained on against 2,500
  COCO2017-val images with their captions. The two sets differ in source as well as membership,
  which the audit's blind baseline measures and warns of; a fine-tune split (members the images a
  fine-tune saw, non-members held out from the same collection) does not have that flaw.
* Images centre-cropped and resized (bicubic) to 512x512 RGB, the resolution SD 1.x trained at;
  latents 64x64x4 (the VAE's posterior mean times its scaling factor).
* Attacks: DRC (latent RePaint inpainting under the caption, or a 9-channel UNet's own masked
  conditioning), Loss, SecMI, PIA, PIAN, SimA, ReDiffuse, each under its caption without guidance
  (``config.text.attack_guidance_scale`` 1), and CLiD at its authors' code defaults (t = 440,
  450, 460; the caption's character thirds and the empty caption as the weakened conditions;
  ``attacks/conditional.py``). Attack timesteps are the DDPM papers' (they index SD's 1,000 steps).
* DRC: the centre box holding half the image removed, deterministic DDIM inpainting in 50 steps
  from pure noise, K = 4 restorations, masked MSE, classifier-free guidance 1 (the model's own
  conditional prediction; ``text.guidance_scale`` sets it).
* Batches of 32 images (a multiple of 8 devices; a 16 GB accelerator holds the SD UNet's
  activations for them), score shards of 256.

Variants (combine with commas): ``model=PATH`` (the imported workdir), ``members=DIR``,
``nonmembers=DIR``, ``res=N`` (image side, a multiple of 64); ``runlocal``: a CPU run of minutes on
a seeded random tiny Stable Diffusion (``random:sd-tiny``: KL autoencoder, cross-attention UNet,
CLIP text tower, its own tokenizer) with Fashion-MNIST images as 32x32 RGB, captioned by class
('a photo of a sneaker'), every attack including CLiD: it runs every code path, its figures mean
nothing; ``inpaint``: with ``runlocal``, the 9-channel inpainting variant
(``random:sd-tiny-inpaint``).
"""

from drc_jax.core import config_base


def get_config(arg=None):
  a = config_base.parse_arg(
    arg, runlocal=False, inpaint=False, model='', members='', nonmembers='', res=512
  )
  c = config_base.base_config()
  c.mode = 'audit'  # an imported target is audited, never trained here
  c.data.source = 'folder'
  c.data.resolution = a.res
  c.data.channels = 3
  c.split.members_dir = a.members
  c.split.nonmembers_dir = a.nonmembers
  c.split.num_members = 2500
  c.split.num_nonmembers = 2500

  c.text.captions = 'file'

  # SD's schedule (scaled_linear 0.00085 .. 0.012, 1,000 steps): the target's model.json is what
  # the audit uses; these fields only document it.
  c.diffusion.beta_schedule = 'scaled_linear'
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012

  c.attacks.names = 'drc,loss,secmi,pia,pian,sima,rediffuse,clid'
  c.drc.mask = 'center_box'
  c.drc.mask_ratio = 0.5
  c.drc.restorer = 'ddim'
  c.drc.steps = 50
  c.drc.num_restorations = 4

  c.audit.checkpoint = a.model
  c.audit.batch_size = 32
  c.audit.shard_size = 256
  c.audit.num_samples = 64

  if a.runlocal:
    config_base.apply_runlocal(c)
    c.audit.checkpoint = 'random:sd-tiny-inpaint' if a.inpaint else 'random:sd-tiny'
    c.data.source = 'fashion_mnist'
    c.data.resolution = 32
    c.data.convert_channels = True  # Fashion-MNIST is grayscale; the tiny SD takes RGB
    c.split.members_dir = c.split.nonmembers_dir = ''
    c.text.captions = 'class_template'
    c.diffusion.beta_start = 0.00085
    c.attacks.secmi_t, c.attacks.secmi_k = 100, 50  # 3 model calls: a smoke run
    c.attacks.rediffuse_n = 2
    c.audit.batch_size = 8
    c.audit.shard_size = 16
    c.split.num_members = c.split.num_nonmembers = 16
    c.audit.num_samples = 8
  return c
