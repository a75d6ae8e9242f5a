"""What an image encoder expects of its input (size, resize filter, normalisation), and the pure
function that prepares drc_jax images ([-1, 1], any size, gray or RGB) for it inside jitted code.
The encoder networks (``vit``, ``clip``, ``facenet``) declare their defaults with it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What the PyTorch model expects of its input: size, resize filter and normalisation."""

  size: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize: str = 'bicubic'


def prepare_fn(pre: Preprocess) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """images in [-1, 1], [B, H, W, C] (C 1 or 3) -> the encoder's input [B, h, w, 3] (pure)."""

  def prepare(images):
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    h, w = pre.size
    if x.shape[1:3] != (h, w):
      x = jax.image.resize(x, (x.shape[0], h, w, 3), method=pre.resize, antialias=True)
    mean = jnp.asarray(pre.mean, jnp.float32).reshape(1, 1, 1, 3)
    std = jnp.asarray(pre.std, jnp.float32).reshape(1, 1, 1, 3)
    return (x - mean) / std  # [1, 1, 1, 3]: no implicit rank promotion

  return prepare
