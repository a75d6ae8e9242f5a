"""CIFAR10 membership audit under the published SecMI/PIA protocol (the DRC paper's CIFAR10 row).

Choices (built by ``configs/_cifar.py``), all the published ones where one exists
and not tuned for any attack:
* Data: tfds ``cifar10`` split 'train' (50,000 images, 32x32 RGB). 25,000 members and 25,000
  non-members. ``config.split.file`` may name a SecMI/PIA ``.npz`` split (``mia_train_idxs`` =
  members, ``mia_eval_idxs`` = non-members) to audit the same images as published results; left
  empty, a split is made from ``config.split.seed`` and written to ``<workdir>/split.json``.
* ``data.tfds_order = 'id'``: SecMI/PIA indices point into torchvision's order of the train set
  (data_batch_1..5), while TFDS shuffles the records when it builds the dataset; its 'id' feature
  ('train_01234') keeps the original index, so images are indexed by it.
* Target: the paper DDPM (T = 1000, linear betas 1e-4..0.02, epsilon prediction) and UNet (ch 128,
  ch_mult (1, 2, 2, 2), 2 blocks per level, attention at 16x16, dropout 0.1; about 35.7M
  parameters), Adam lr 2e-4 with 5,000 warm-up steps, batch 128, grad clip 1, EMA 0.9999, random
  flips, 800k steps on the members only (each member seen about 4,000 times). Attacks use the
  EMA weights; ``config.audit.checkpoint`` may name a converted public target instead.
* Attack hyper-parameters are the papers' (t = 200 for Loss and PIA, SecMI t = 100, k = 10).
* DRC: the centre box holding half the image is removed (rho = 0.5, as the paper uses on CIFAR;
  its DINO "important region" is not public and is mostly central on CIFAR), restored by
  deterministic DDIM inpainting (eta 0, the restorer third parties report) from pure noise
  (t_start = 1000) in 200 steps (the reported interval 5; ``core/protocol.py``'s ``PAPER``),
  K = 4 restorations per image (different keys), compared by masked MSE on the removed region
  and scored by their mean: 50,000 x 4 x 200 = 40M model calls for the whole audit.
  ``config.drc.steps=100`` halves that at interval 10.
* Audit batches of 256 images, score shards of 2,048 (the unit of resume).

Variants: ``:runlocal`` shrinks to a CPU smoke run of seconds (tiny UNet, 32 + 32 images, tfds
record order since mock data ids are random strings). ``:paper`` uses the paper's DRC steps: the
top-rho 4x4 patches of a DINO ViT's CLS attention removed (``--config.drc.saliency_encoder=DIR``)
and CLIP cosine (``--config.drc.compare_encoder=DIR``; README, "Encoders"), scored by the agree
number (``core/protocol.py``'s ``PAPER``); with ``runlocal``, tiny random encoders stand in.
"""

from drc_jax.core import config_base


def get_config(arg=None):
  return config_base.sibling(__file__, '_cifar').get_config('cifar10', arg)
