"""What configs/cifar10.py and configs/cifar100.py share: the published SecMI/PIA protocol."""

from __future__ import annotations

import ml_collections

from drc_jax.core import config_base


def get_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """The published SecMI/PIA protocol on tfds ``name`` (cifar10 or cifar100); see configs/."""
  a = config_base.parse_arg(arg, runlocal=False, paper=False)
  c = config_base.base_config()
  c.data.source = 'tfds'  # tensorflow-datasets through tfds.data_source
  c.data.name = name  # tfds builder
  c.data.tfds_order = 'id'  # torchvision order: the order SecMI/PIA split indices point into
  # The base values are this protocol's: split 'train' at 32x32x3, 25,000 members and 25,000
  # non-members; the paper UNet and training recipe (ch 128, (1, 2, 2, 2), 2 blocks, attention
  # at 16, dropout 0.1; 800k steps of batch 128, lr 2e-4, warm-up 5000, EMA 0.9999).
  config_base.set_paper_drc(c)
  if a.runlocal:
    config_base.apply_runlocal(c)
    c.data.tfds_order = ''  # mock data ids are random strings, not 'train_NNNNN'
  if a.paper:
    # The paper's DRC on CIFAR: DINO attention mask, CLIP cosine. Give the encoders with
    # --config.drc.saliency_encoder=DIR (DINO ViT-S/16) --config.drc.compare_encoder=DIR (CLIP).
    config_base.set_paper_semantic_drc(c, 'dino', a.runlocal, 'random:clip-tiny')
  return c
