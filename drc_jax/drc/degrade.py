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

  The paper finds the important region with a DINO ViT's self-attention (``drc.saliency='dino'``
  with a converted encoder); without one, this default marks pixels that differ from the image
  border.
  """
  border = jnp.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)  # [P, C]
  return jnp.sqrt(jnp.sum(jnp.square(image - border.mean(axis=0)[None, None, :]), axis=-1))


def _center_box(key, image, cfg, saliency):
  del key, saliency
  h, w, _ = image.shape
  sh, sw = _box_side(h, w, cfg.mask_ratio)
  return box_mask(h, w, cfg.mask_ratio, (h - sh) // 2, (w - sw) // 2)


def _random_box(key, image, cfg, saliency):
  del saliency
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


def _random_patches(key, image, cfg, saliency):
  del saliency
  h, w = _patch_grid(image, cfg.patch_size)
  p = cfg.patch_size
  scores = jax.random.uniform(key, ((h // p) * (w // p),))
  return patch_mask_from_scores(scores, h, w, p, cfg.mask_ratio)


def _saliency_patches(key, image, cfg, saliency):
  del key
  h, w = _patch_grid(image, cfg.patch_size)
  p = cfg.patch_size
  scores = saliency.reshape(h // p, p, w // p, p).mean(axis=(1, 3)).reshape(-1)
  return patch_mask_from_scores(scores, h, w, p, cfg.mask_ratio)


@dataclasses.dataclass(frozen=True)
class _MaskCfg:
  mask_ratio: float
  patch_size: int


# One registry of inpainting masks drawn in the program: name -> fn(key, image [H,W,C], cfg,
# saliency [H,W] or None) -> [H,W,1] keep mask. GIVEN masks come with the batch (the face box,
# detected on the host before scoring); the linear degradations beside them need DDNM.
MASKS: dict[str, Callable] = {
  'center_box': _center_box,
  'random_box': _random_box,
  'random_patches': _random_patches,
  'saliency_patches': _saliency_patches,
}
LINEAR = ('downsample', 'grayscale')
GIVEN = ('face',)
# Saliency maps for 'saliency_patches': 'foreground' (encoder-free, below) or 'dino' (a ViT's CLS
# attention, ``saliency.dino_saliency``, computed by the caller and passed to ``degrade``).
SALIENCY = ('foreground', 'dino')


def make_degrader(cfg):
  """Returns ``degrade(keys [B], images [B,H,W,C], saliency=None, given_mask=None) ->
  Degradation`` for a ``drc`` config section.

  ``cfg.mask`` is a key of ``MASKS`` (inpainting, removing ``cfg.mask_ratio`` of the image;
  ``cfg.invert_mask`` removes the complement), of ``GIVEN`` ('face': ``given_mask`` [B,H,W,1], the
  keep mask made on the host), or a linear degradation of ``LINEAR``: 'downsample' (factor
  ``cfg.patch_size``) and 'grayscale'. 'saliency_patches' removes the patches of highest
  ``saliency`` [B,H,W] (default: ``foreground_saliency`` of each image).
  """
  kind, patch = cfg.mask, int(cfg.patch_size)
  mcfg = _MaskCfg(float(cfg.mask_ratio), patch)
  if kind not in MASKS and kind not in LINEAR and kind not in GIVEN:
    raise ValueError(f'config.drc.mask: unknown {kind!r}')

  def one_mask(key, image, saliency):
    m = MASKS[kind](key, image, mcfg, saliency)
    return 1.0 - m if cfg.invert_mask else m

  def degrade(keys: jnp.ndarray, images: jnp.ndarray, saliency=None, given_mask=None):
    b, h, w, c = images.shape
    if kind == 'downsample':
      if h % patch or w % patch:
        raise ValueError(f'config.drc.patch_size {patch} does not divide the image {h}x{w}')
      d = Degradation(images, jnp.ones((b, h, w, 1), images.dtype), 'downsample', patch)
    elif kind == 'grayscale':
      d = Degradation(images, jnp.ones((b, h, w, 1), images.dtype), 'grayscale', 1)
    elif kind in GIVEN:
      if given_mask is None:
        raise ValueError(f'config.drc.mask={kind!r}: the keep masks must come with the batch')
      mask = given_mask.astype(images.dtype)
      d = Degradation(images, 1.0 - mask if cfg.invert_mask else mask, 'mask', 1)
    else:
      if kind == 'saliency_patches' and saliency is None:
        saliency = jax.vmap(foreground_saliency)(images)
      if saliency is None:
        mask = jax.vmap(lambda k, x: one_mask(k, x, None))(keys, images)
      else:
        mask = jax.vmap(one_mask)(keys, images, saliency)
      d = Degradation(images, mask.astype(images.dtype), 'mask', 1)
    return d.replace(measurement=d.forward(images))

  return degrade
