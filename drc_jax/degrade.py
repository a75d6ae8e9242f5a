"""Degraders: pure functions ``(keys [B], images [B,H,W,C]) -> Degradation``.

A ``Degradation`` is a pytree carrying what a restorer needs: the measurement ``y = A(x)`` of a
linear operator ``A`` and, for inpainting, the keep mask (1 = known pixel). Every operator has a
pseudo-inverse with ``A(A_pinv(y)) = y``:

* ``mask``: ``A(x) = m * x`` (``A_pinv = A``); the restored region is ``1 - m``.
* ``downsample`` (super-resolution): ``s x s`` average pooling; ``A_pinv`` repeats each pixel.
* ``grayscale`` (colorization): the channel mean; ``A_pinv`` copies it to every channel.

Masks are drawn per image from that image's key (so a batch holds different masks, and an
image's mask does not depend on which batch it lands in).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Degradation:
  """What a restorer needs; all array leaves have the batch as their leading axis."""

  measurement: jnp.ndarray  # y = A(x): [B, H, W, C] (mask), [B, H/s, W/s, C], or [B, H, W, 1]
  mask: jnp.ndarray  # [B, H, W, 1] keep mask for inpainting; ones for the other operators
  kind: str = flax.struct.field(pytree_node=False, default='mask')
  factor: int = flax.struct.field(pytree_node=False, default=1)

  def forward(self, x: jnp.ndarray) -> jnp.ndarray:
    """A(x)."""
    if self.kind == 'mask':
      return x * self.mask
    if self.kind == 'downsample':
      b, h, w, c = x.shape
      s = self.factor
      return x.reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))
    return x.mean(axis=-1, keepdims=True)  # grayscale

  def pinv(self, y: jnp.ndarray, channels: int | None = None) -> jnp.ndarray:
    """A_pinv(y), an image of the original shape."""
    if self.kind == 'mask':
      return y * self.mask
    if self.kind == 'downsample':
      s = self.factor
      return jnp.repeat(jnp.repeat(y, s, axis=1), s, axis=2)
    return jnp.repeat(y, channels or 3, axis=-1)

  def region(self) -> jnp.ndarray:
    """[B, H, W, 1] weights of the pixels the restorer had to make up (1 = restored).

    Inpainting: the removed pixels. Super-resolution and colorization change every pixel.
    """
    return 1.0 - self.mask if self.kind == 'mask' else jnp.ones_like(self.mask)

  def degraded_image(self, channels: int) -> jnp.ndarray:
    """The degraded image as a person would see it (removed pixels are 0, mid-grey)."""
    return self.pinv(self.measurement, channels)


def box_mask(h: int, w: int, ratio: float, top, left) -> jnp.ndarray:
  """[H, W, 1] keep mask with a square box of area ``ratio`` removed at (top, left)."""
  side_h, side_w = _box_side(h, w, ratio)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
  return jnp.where(inside, 0.0, 1.0)[..., None]


def _box_side(h: int, w: int, ratio: float) -> tuple[int, int]:
  side_h = max(1, min(h, int(round(math.sqrt(ratio) * h))))
  side_w = max(1, min(w, int(round(math.sqrt(ratio) * w))))
  return side_h, side_w


def patch_mask_from_scores(
  scores: jnp.ndarray, h: int, w: int, patch: int, ratio: float
) -> jnp.ndarray:
  """[H, W, 1] keep mask removing the ``round(ratio * n)`` patches of highest score.

  ``scores``: [H/patch * W/patch] one score per patch (row-major).
  """
  n = scores.shape[0]
  k = max(1, min(n, int(round(ratio * n))))
  order = jnp.argsort(-scores)  # stable: ties go to the earlier patch
  removed = jnp.zeros((n,), bool).at[order[:k]].set(True)
  grid = removed.reshape(h // patch, w // patch)
  grid = jnp.repeat(jnp.repeat(grid, patch, axis=0), patch, axis=1)
  return jnp.where(grid, 0.0, 1.0)[..., None]


def foreground_saliency(image: jnp.ndarray) -> jnp.ndarray:
  """[H, W] encoder-free saliency: distance from the border colour (the object, not background).

  The paper finds the important region with a DINO ViT's self-attention; that needs weights this
  tool cannot download, so this default marks pixels that differ from the image border. Any
  function ``image [H, W, C] -> [H, W]`` can be passed instead.
  """
  border = jnp.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)  # [P, C]
  return jnp.sqrt(jnp.sum(jnp.square(image - border.mean(axis=0)[None, None, :]), axis=-1))


def _center_box(key, image, cfg, saliency_fn):
  del key, saliency_fn
  h, w, _ = image.shape
  sh, sw = _box_side(h, w, cfg.mask_ratio)
  return box_mask(h, w, cfg.mask_ratio, (h - sh) // 2, (w - sw) // 2)


def _random_box(key, image, cfg, saliency_fn):
  del saliency_fn
  h, w, _ = image.shape
  sh, sw = _box_side(h, w, cfg.mask_ratio)
  kt, kl = jax.random.split(key)
  return box_mask(
    h,
    w,
    cfg.mask_ratio,
    jax.random.randint(kt, (), 0, h - sh + 1),
    jax.random.randint(kl, (), 0, w - sw + 1),
  )


def _patch_grid(image, patch: int) -> tuple[int, int]:
  h, w, _ = image.shape
  if h % patch or w % patch:
    raise ValueError(f'config.drc.patch_size {patch} does not divide the image {h}x{w}')
  return h, w


def _random_patches(key, image, cfg, saliency_fn):
  del saliency_fn
  h, w = _patch_grid(image, cfg.patch_size)
  p = cfg.patch_size
  scores = jax.random.uniform(key, ((h // p) * (w // p),))
  return patch_mask_from_scores(scores, h, w, p, cfg.mask_ratio)


def _saliency_patches(key, image, cfg, saliency_fn):
  del key
  h, w = _patch_grid(image, cfg.patch_size)
  p = cfg.patch_size
  sal = saliency_fn(image)
  scores = sal.reshape(h // p, p, w // p, p).mean(axis=(1, 3)).reshape(-1)
  return patch_mask_from_scores(scores, h, w, p, cfg.mask_ratio)


@dataclasses.dataclass(frozen=True)
class _MaskCfg:
  mask_ratio: float
  patch_size: int


# One registry of inpainting masks: name -> fn(key, image [H,W,C], cfg, saliency_fn) -> [H,W,1]
# keep mask. The linear degradations beside them need DDNM.
MASKS: dict[str, Callable] = {
  'center_box': _center_box,
  'random_box': _random_box,
  'random_patches': _random_patches,
  'saliency_patches': _saliency_patches,
}
LINEAR = ('downsample', 'grayscale')


def make_degrader(cfg, saliency_fn: Callable[[jnp.ndarray], jnp.ndarray] = foreground_saliency):
  """Returns ``degrade(keys [B], images [B,H,W,C]) -> Degradation`` for a ``drc`` config section.

  ``cfg.mask`` is a key of ``MASKS`` (inpainting, removing ``cfg.mask_ratio`` of the image;
  ``cfg.invert_mask`` removes the complement), or a linear degradation of ``LINEAR``:
  'downsample' (factor ``cfg.patch_size``) and 'grayscale'.
  """
  kind, patch = cfg.mask, int(cfg.patch_size)
  mcfg = _MaskCfg(float(cfg.mask_ratio), patch)
  if kind not in MASKS and kind not in LINEAR:
    raise ValueError(f'config.drc.mask: unknown {kind!r}')

  def one_mask(key, image):
    m = MASKS[kind](key, image, mcfg, saliency_fn)
    return 1.0 - m if cfg.invert_mask else m

  def degrade(keys: jnp.ndarray, images: jnp.ndarray) -> Degradation:
    b, h, w, c = images.shape
    if kind == 'downsample':
      if h % patch or w % patch:
        raise ValueError(f'config.drc.patch_size {patch} does not divide the image {h}x{w}')
      d = Degradation(images, jnp.ones((b, h, w, 1), images.dtype), 'downsample', patch)
    elif kind == 'grayscale':
      d = Degradation(images, jnp.ones((b, h, w, 1), images.dtype), 'grayscale', 1)
    else:
      mask = jax.vmap(one_mask)(keys, images).astype(images.dtype)  # [B, H, W, 1]
      d = Degradation(images, mask, 'mask', 1)
    return d.replace(measurement=d.forward(images))

  return degrade
