"""drc_jax: Degrade, Restore, Compare membership audits of diffusion models in JAX."""

import os


def _cpu_defaults() -> None:
  """XLA:CPU runs convolutions through its YNNPACK fusions on one thread; with them off, Eigen's
  convolutions use every core (1.7x on a 3x3 convolution of the default UNet on 2 cores,
  launch/profile_unet.py and README "Speed"). Set before JAX starts its CPU backend, only for
  the jaxlib release it was measured on (an unknown XLA flag stops XLA), and never over a
  user's own setting; DRC_JAX_XLA_DEFAULTS=0 turns it off."""
  if os.environ.get('DRC_JAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' in flags:
    return
  try:
    from importlib.metadata import version  # pylint: disable=g-import-not-at-top

    major_minor = tuple(int(v) for v in version('jaxlib').split('.')[:2])
  except Exception:  # pylint: disable=broad-except  (no jaxlib metadata: leave XLA as it is)
    return
  if major_minor == (0, 10):  # the releases this default was measured on
    os.environ['XLA_FLAGS'] = (flags + ' --xla_cpu_experimental_ynn_fusion_type=').strip()


_cpu_defaults()

from drc_jax.encoders import load_encoder  # noqa: E402
from drc_jax.target import load_target  # noqa: E402

__all__ = ['load_encoder', 'load_target']
