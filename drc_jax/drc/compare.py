"""Comparators: ``(original, restored, degradation) -> similarity [B]``, higher = more alike.

Images are in [-1, 1] (data range 2). Pixel comparators are encoder-free; ``feature_cosine``
wraps any encoder ``images -> features`` (CLIP, a face-recognition network, DINO) into a
comparator, so the paper's semantic comparisons plug in where weights are available.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from drc_jax.drc import degrade as degrade_lib

Comparator = Callable[[jnp.ndarray, jnp.ndarray, degrade_lib.Degradation], jnp.ndarray]
DATA_RANGE = 2.0


def masked_mse(x: jnp.ndarray, y: jnp.ndarray, region: jnp.ndarray) -> jnp.ndarray:
  """Mean squared error over the region's pixels (all channels): [B]."""
  w = jnp.broadcast_to(region, x.shape)
  return jnp.sum(w * jnp.square(x - y), axis=(1, 2, 3)) / jnp.maximum(
    jnp.sum(w, axis=(1, 2, 3)), 1e-12
  )


def neg_masked_mse(x, y, d: degrade_lib.Degradation) -> jnp.ndarray:
  """Similarity = -MSE on the restored region."""
  return -masked_mse(x, y, d.region())


def psnr(x, y, d: degrade_lib.Degradation) -> jnp.ndarray:
  """PSNR (dB) on the restored region, peak-to-peak 2."""
  mse = masked_mse(x, y, d.region())
  return 10.0 * jnp.log10(DATA_RANGE**2 / jnp.maximum(mse, 1e-12))


def _gaussian_window(size: int, sigma: float) -> jnp.ndarray:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-(r**2) / (2 * sigma**2))
  return g / g.sum()


def ssim_map(x: jnp.ndarray, y: jnp.ndarray, window: int = 11, sigma: float = 1.5) -> jnp.ndarray:
  """Per-pixel SSIM [B, H, W] (Wang et al. 2004, Gaussian window, mean over channels).

  Local statistics use a separable Gaussian with zero padding, renormalised at the borders so
  every pixel's window sums to 1 (no shrinking of small images).
  """
  size = min(window, x.shape[1], x.shape[2])
  g = _gaussian_window(size, sigma)

  def blur(img):  # [B, H, W, C]
    c = img.shape[-1]
    kh = jnp.tile(g.reshape(size, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(g.reshape(1, size, 1, 1), (1, 1, 1, c))
    dn = ('NHWC', 'HWIO', 'NHWC')
    out = jax.lax.conv_general_dilated(
      img, kh, (1, 1), 'SAME', dimension_numbers=dn, feature_group_count=c
    )
    return jax.lax.conv_general_dilated(
      out, kw, (1, 1), 'SAME', dimension_numbers=dn, feature_group_count=c
    )

  norm = blur(jnp.ones_like(x[..., :1]))
  mu_x, mu_y = blur(x) / norm, blur(y) / norm
  sxx = blur(x * x) / norm - mu_x**2
  syy = blur(y * y) / norm - mu_y**2
  sxy = blur(x * y) / norm - mu_x * mu_y
  c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
  return s.mean(axis=-1)


def ssim(x, y, d: degrade_lib.Degradation) -> jnp.ndarray:
  """SSIM over the whole image: [B]."""
  del d
  return ssim_map(x, y).mean(axis=(1, 2))


def ssim_region(x, y, d: degrade_lib.Degradation) -> jnp.ndarray:
  """SSIM averaged over the restored region: [B]."""
  w = d.region()[..., 0]
  return jnp.sum(ssim_map(x, y) * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-12)


def cosine(fx: jnp.ndarray, fy: jnp.ndarray) -> jnp.ndarray:
  """[B] cosine similarity of feature rows [B, D] (the semantic comparator of the paper)."""
  num = jnp.sum(fx * fy, axis=-1)
  return num / jnp.maximum(jnp.linalg.norm(fx, axis=-1) * jnp.linalg.norm(fy, axis=-1), 1e-12)


def feature_cosine(encoder: Callable[[jnp.ndarray], jnp.ndarray]) -> Comparator:
  """Comparator from an encoder ``images [B,H,W,C] -> features [B, D]``: cosine similarity."""

  def compare(x, y, d):
    del d
    return cosine(encoder(x), encoder(y))

  return compare


COMPARATORS: dict[str, Comparator] = {
  'masked_mse': neg_masked_mse,
  'psnr': psnr,
  'ssim': ssim,
  'ssim_region': ssim_region,
}


# Comparators that need an encoder (``drc.compare_encoder``); DRC builds them from its encoders.
ENCODER_COMPARATORS = ('cosine',)


def get(name: str) -> Comparator:
  if name not in COMPARATORS:
    raise ValueError(f'config.drc.comparator: unknown {name!r}; known: {sorted(COMPARATORS)}')
  return COMPARATORS[name]
