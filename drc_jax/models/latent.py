"""A latent diffusion model as one pure-function model: the UNet on latents plus its autoencoder.

``LatentModel`` has the interface the attacks and restorers use for pixel UNets
(``apply(params, x, t)``, ``config``) over params ``{'unet': ..., 'vq': ...}``, plus
``encode(params, images) -> latents`` (``scaling_factor * vq.encode``, what the UNet was trained on)
and ``decode(params, latents) -> images`` (``vq.decode(z / scaling_factor)``, as ``LDMPipeline``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from drc_jax.models import unet as unet_lib
from drc_jax.models import vq as vq_lib


@dataclasses.dataclass(frozen=True)
class LatentModel:
  """The UNet on latents and its VQ autoencoder, as pure functions of ``{'unet', 'vq'}`` params."""

  unet: unet_lib.DiffusionModel
  autoencoder: vq_lib.Autoencoder
  scaling_factor: float
  image_shape: tuple[int, int, int]  # [H, W, C] of the images
  downsampling_factor: int

  is_latent = True

  @property
  def config(self) -> unet_lib.UNetConfig:
    """The UNet's config (its resolution and channels are the latents')."""
    return self.unet.config

  def apply(self, params, z, t) -> jnp.ndarray:
    return self.unet.apply(params['unet'], z, t)

  def encode(self, params, images) -> jnp.ndarray:
    """[B, H, W, C] images in [-1, 1] -> the UNet's latents [B, h, w, c] (scaled)."""
    return self.scaling_factor * self.autoencoder.encode(params['vq'], images)

  def decode(self, params, z) -> jnp.ndarray:
    """The UNet's latents -> [B, H, W, C] images (about [-1, 1])."""
    return self.autoencoder.decode(params['vq'], z / self.scaling_factor)


def latent_keep_mask(mask: jnp.ndarray, factor: int) -> jnp.ndarray:
  """A pixel keep mask [B, H, W, 1] on the latent grid [B, H/f, W/f, 1]: a latent pixel is known
  only when every image pixel it covers is (a removed pixel leaves no trace in the known latents).
  """
  b, h, w, _ = mask.shape
  blocks = mask.reshape(b, h // factor, factor, w // factor, factor, 1)
  return jnp.min(blocks, axis=(2, 4))


def from_target(target) -> tuple[LatentModel, Any]:
  """The LatentModel and its params ``{'unet', 'vq'}`` of a loaded ``target.LatentTarget``."""
  model = LatentModel(
    target.model,
    target.autoencoder,
    float(target.scaling_factor),
    tuple(target.image_shape),
    int(target.downsampling_factor),
  )
  return model, {'unet': target.params, 'vq': target.autoencoder_params}
