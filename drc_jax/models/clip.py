"""CLIP's image tower in Flax NNX: the projected image embedding OpenCLIP and Hugging Face give.

One module serves both public layouts; they compute the same function and differ only in names
(mapped by the converters) and in settings carried by the config:

* OpenCLIP ``model.encode_image(x)`` (``model.visual``, a ``VisionTransformer``): ``conv1``
  (no bias), ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks``
  (``ln_1``, ``nn.MultiheadAttention`` with a fused ``in_proj``, ``ln_2``, ``c_fc``-act-``c_proj``),
  ``ln_post`` on the CLS token, then ``@ proj``. QuickGELU for OpenAI's weights and the
  ``*-quickgelu`` models, exact GELU otherwise; LayerNorm eps 1e-5.
* Hugging Face ``CLIPVisionModelWithProjection(...).image_embeds``: ``embeddings`` (patch conv
  without bias, class embedding, position embedding table), ``pre_layrnorm``, encoder layers with
  separate q/k/v projections (fused here), ``post_layernorm`` on the CLS token, then
  ``visual_projection`` (no bias). Activation and eps from its config (``hidden_act``,
  ``layer_norm_eps``).

Neither resamples position embeddings for another input size (OpenCLIP cannot; HF only when asked),
so ``embed`` refuses an input whose patch grid differs from the config's: ``Encoder.prepare``
resizes to the trained size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.models import preprocess as preprocess_lib
from drc_jax.models import vit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a CLIP image tower (the defaults are OpenAI's ViT-B/32)."""

  image_size: int = 224  # input side (grid = image_size // patch_size)
  patch_size: int = 32  # patch side (kernel and stride of conv1)
  width: int = 768  # token width
  layers: int = 12  # number of transformer blocks
  heads: int = 12  # attention heads (width // 64 in OpenCLIP's and OpenAI's towers)
  mlp_dim: int = 3072  # hidden width of each block's MLP
  output_dim: int = 512  # width of the projected embedding
  activation: str = 'quick_gelu'  # 'quick_gelu' (OpenAI's weights) or 'gelu' (exact erf)
  norm_eps: float = 1e-5  # LayerNorm epsilon
  channels: int = 3  # input channels

  def __post_init__(self):
    names = ('image_size', 'patch_size', 'width', 'layers', 'heads', 'mlp_dim', 'output_dim')
    for name in names:
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of patch {self.patch_size}')
    if self.width % self.heads:
      raise ValueError(f'width {self.width} is not divisible by heads {self.heads}')
    if self.activation not in vit.ACTIVATIONS:
      raise ValueError(f'activation {self.activation!r} is not one of {vit.ACTIVATIONS}')

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


# The paper's CLIP is ViT-B/32 or ViT-L/14 (OpenAI's weights: QuickGELU); tiny ones for tests.
CONFIGS = {
  'vit_b32': CLIPConfig(),
  'vit_b16': CLIPConfig(patch_size=16),
  'vit_l14': CLIPConfig(
    patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, output_dim=768
  ),
  'tiny': CLIPConfig(
    image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_dim=128, output_dim=32
  ),
}


def default_preprocess(config: CLIPConfig) -> preprocess_lib.Preprocess:
  """CLIP's input: its image size, CLIP's mean and std, bicubic resizing."""
  s = config.image_size
  return preprocess_lib.Preprocess((s, s), CLIP_MEAN, CLIP_STD, 'bicubic')


class CLIPVision(nnx.Module):
  """CLIP image tower; ``embed(x [B, H, W, C]) -> [B, output_dim]`` (projected, not normalised)."""

  def __init__(self, cfg: CLIPConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    w, p = cfg.width, cfg.patch_size
    self.conv1 = nnx.Conv(
      cfg.channels, w, kernel_size=(p, p), strides=(p, p), padding='VALID', use_bias=False,
      rngs=rngs,
    )  # fmt: skip
    scale = w**-0.5
    self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (w,)))
    self.positional_embedding = nnx.Param(
      scale * jax.random.normal(rngs.params(), (cfg.grid**2 + 1, w))
    )
    self.ln_pre = vit.layer_norm(w, cfg.norm_eps, rngs)
    self.blocks = nnx.List(
      [
        vit.Block(w, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.norm_eps, rngs)
        for _ in range(cfg.layers)
      ]
    )
    self.ln_post = vit.layer_norm(w, cfg.norm_eps, rngs)
    self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (w, cfg.output_dim)))

  def embed(self, x):
    gh, gw = vit.patch_grid(x, self.cfg.patch_size, 'CLIP')
    if (gh, gw) != (self.cfg.grid, self.cfg.grid):
      s = self.cfg.image_size
      raise ValueError(
        f'CLIP: input {x.shape[1]}x{x.shape[2]} differs from image_size {s}x{s} of its config '
        '(resize with Encoder.prepare)'
      )
    b = x.shape[0]
    h = self.conv1(x.astype(jnp.float32)).reshape(b, gh * gw, self.cfg.width)
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, self.cfg.width))
    h = jnp.concatenate([cls, h], axis=1) + self.positional_embedding[...][None]
    h = self.ln_pre(h)
    for block in self.blocks:
      h = block(h)
    return self.ln_post(h[:, 0]) @ self.proj[...]
