"""Where a self-supervised ViT looks: DINO's CLS-attention map as a per-pixel saliency.

``dino_saliency(encoder)`` returns a pure, jit-able ``saliency(params, images) -> [B, H, W]``:
drc_jax images ([-1, 1], [B, H, W, C]) are resized and normalised to the encoder's input
(``Encoder.prepare``), the last block's CLS attention over the patches (``cls_attention``,
[B, heads, N]) is averaged over heads, laid out on the patch grid and upsampled bilinearly
(half-pixel centres, as PyTorch's ``align_corners=False``) to the images' H x W. The map is
non-negative and sums to less than one over the patches (the CLS key's share is left out, as in
DINO's visualisation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from drc_jax.targets import encoders


def dino_saliency(encoder: encoders.Encoder) -> Callable[..., jnp.ndarray]:
  """The saliency function of a ViT encoder (one with ``cls_attention``).

  Args:
    encoder: a loaded encoder (``drc_jax.load_encoder``); only its architecture and preprocessing
      are captured, the weights are the ``params`` argument of the returned function.

  Returns:
    ``saliency(params, images [B, H, W, C] in [-1, 1]) -> [B, H, W] float32``.
  """
  if not encoder.has_cls_attention:
    raise encoders.EncoderError(
      f'a {encoder.family} encoder has no CLS attention: the dino saliency needs a ViT encoder'
    )
  prepare = encoders.prepare_fn(encoder.preprocess)
  patch = encoder.config.patch_size
  gh, gw = (s // patch for s in encoder.preprocess.size)
  attention = encoder.cls_attention_fn

  def saliency(params, images):
    b, h, w = images.shape[:3]
    attn = attention(params, prepare(images))  # [B, heads, gh * gw]
    grid = jnp.mean(attn, axis=1).reshape(b, gh, gw)
    return jax.image.resize(grid, (b, h, w), method='bilinear')  # [B, H, W]

  return saliency
