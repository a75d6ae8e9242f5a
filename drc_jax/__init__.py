"""drc_jax: Degrade, Restore, Compare membership audits of diffusion models in JAX."""

from drc_jax.encoders import load_encoder
from drc_jax.target import load_target

__all__ = ['load_encoder', 'load_target']
