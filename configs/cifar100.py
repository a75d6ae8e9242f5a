"""CIFAR100 membership audit under the published SecMI/PIA protocol (the DRC paper's CIFAR100 row).

Everything as in ``configs/cifar10.py`` (both are built by ``configs/_cifar.py``),
on tfds ``cifar100`` split 'train': 25,000 members and 25,000 non-members, or a SecMI/PIA ``.npz``
in ``config.split.file``; images indexed in the original order of the 'train' file through the
tfds 'id' feature; the paper DDPM and UNet; the papers' attack settings; DRC by DDIM inpainting
of the central half (rho = 0.5) from pure noise in 200 steps (the paper's restorer), K = 4.

Variants: ``:paper`` as for cifar10; ``:runlocal`` shrinks to a CPU smoke run of seconds (tiny
UNet, 32 + 32 images).
"""

from drc_jax.core import config_base


def get_config(arg=None):
  return config_base.sibling(__file__, '_cifar').get_config('cifar100', arg)
