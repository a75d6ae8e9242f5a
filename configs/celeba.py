"""CelebA membership audit (the DRC paper's CelebA row) under later work's 30k/30k protocol.

Choices, the published ones where one exists and not tuned for any attack:
* Data: tfds ``celeb_a`` split 'train' (162,770 aligned faces of 218x178), centre-cropped to
  140x140 and resized (bicubic) to 32x32, the usual DDPM CelebA preprocessing. There is no shared
  split: 30,000 members and 30,000 non-members, as later work uses, made from
  ``config.split.seed`` and written to ``<workdir>/split.json`` (``config.split.file`` may name a
  SecMI/PIA ``.npz`` or a manifest instead). TFDS record order: no published indices to match.
* Target: the CIFAR protocol's DDPM and UNet (ch 128, ch_mult (1, 2, 2, 2), 2 blocks per level,
  attention at 16x16 and in the middle, dropout 0.1), Adam lr 2e-4 with 5,000 warm-up steps,
  batch 128, grad clip 1, EMA 0.9999, random flips, 800k steps on the members only (each member
  seen about 3,400 times).
* Attack hyper-parameters are the papers' (t = 200 for Loss and PIA, SecMI t = 100, k = 10).
* DRC: the paper removes the face area; after the centre crop the face fills the centre, so the
  centre box holding half the image is removed (rho = 0.5), restored by deterministic DDIM
  inpainting from pure noise (t_start = 1000) in 200 steps (the paper's restorer,
  ``core/protocol.py``), K = 4 restorations per image, compared by masked MSE on the removed
  region and scored by their mean (the face encoder of the paper is not used).
* Audit batches of 256 images, score shards of 2,048 (the unit of resume).

Variants (combine with commas, e.g. ``:runlocal,res=64``):
* ``res=64``: 64x64 images; the UNet levels are then 64, 32, 16 and 8 and attention stays at 16.
* ``runlocal``: a CPU smoke run of seconds (tiny UNet, 32 + 32 images).
* ``paper``: the paper's DRC steps: the face area removed (the MTCNN face box; ``mask=dino``: the
  top patches of a DINO ViT's attention, ``--config.drc.saliency_encoder=DIR``) and face-ID cosine
  (facenet InceptionResnetV1, ``--config.drc.compare_encoder=DIR``; README, "Encoders"), scored
  by the agree number (``core/protocol.py``'s ``PAPER``). With
  ``runlocal``, random encoders stand in (a smoke run, not a measurement).
"""

from drc_jax.core import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, runlocal=False, res=32, paper=False, mask='face')
  c = config_base.base_config()
  c.data.source = 'tfds'  # tensorflow-datasets through tfds.data_source
  c.data.name = 'celeb_a'  # tfds builder
  c.data.resolution = a.res  # 32 (variant res=64)
  c.data.center_crop = 140  # the face region of the 218x178 aligned images

  c.split.num_members = 30000  # later work's CelebA protocol
  c.split.num_nonmembers = 30000

  # The paper UNet and training recipe are the base defaults; its attention at 16x16 is a level
  # of the UNet at both 32 (32, 16, 8, 4) and 64 (64, 32, 16, 8).

  config_base.set_paper_drc(c)  # centre box rho 0.5 (the face after the centre crop), DDIM
  if a.res not in (32, 64):
    raise ValueError(f'config argument res={a.res}: expected 32 or 64')
  if a.runlocal:
    config_base.apply_runlocal(c)
  if a.paper:
    # The paper's DRC on faces: the face area removed (MTCNN box; 'mask=dino' for DINO attention)
    # and face-ID cosine (facenet InceptionResnetV1, --config.drc.compare_encoder=DIR).
    config_base.set_paper_semantic_drc(c, a.mask, a.runlocal, 'random:facenet')
  return c
