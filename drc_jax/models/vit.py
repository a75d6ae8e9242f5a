"""The Vision Transformer of timm / DINO, in Flax NNX, computing what timm computes.

Layout of timm's ``vision_transformer.VisionTransformer`` with its defaults (the DINO backbones
``vit_small_patch16_224``, ``vit_small_patch8_224``, ``vit_base_patch16_224``): a patch-embedding
convolution (kernel = stride = patch), a CLS token, learned absolute position embeddings with an
entry for the CLS token, ``depth`` pre-norm blocks (LayerNorm -> multi-head self-attention with a
fused qkv projection -> residual; LayerNorm -> Linear-GELU(erf)-Linear -> residual), a final
LayerNorm (eps 1e-6 throughout), and token pooling: ``embed(x)`` is the final-normed CLS token,
what ``timm.create_model(name, num_classes=0)(x)`` returns.

An input whose patch grid differs from the one the position embeddings were trained for gets
them resampled as timm's ``resample_abs_pos_embed`` does (``dynamic_img_size=True``): bicubic with
antialiasing, align_corners=False, CLS entry kept, inside the jitted program.

``cls_attention(x)`` -> [B, heads, N patches]: the last block's softmax attention of the CLS
query over all tokens, with the CLS key's column then dropped (not renormalised), as DINO's
``visualize_attention.py`` takes ``attentions[:, :, 0, 1:]``.

The transformer block and the activations are shared with the CLIP
image tower (``drc_jax.models.clip``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.models import preprocess as preprocess_lib

ACTIVATIONS = ('gelu', 'quick_gelu')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a timm / DINO ViT (the defaults are ViT-S/16 at 224, DINO's ViT-S/16)."""

  image_size: int = 224  # side the position embeddings were trained for (grid = size // patch)
  patch_size: int = 16  # patch side (kernel and stride of the patch-embedding convolution)
  embed_dim: int = 384  # token width
  depth: int = 12  # number of transformer blocks
  num_heads: int = 6  # attention heads (embed_dim // 64 in timm's and DINO's ViTs)
  mlp_dim: int = 1536  # hidden width of each block's MLP (4 x embed_dim in timm's defaults)
  norm_eps: float = 1e-6  # LayerNorm epsilon (timm's ViTs: 1e-6)
  channels: int = 3  # input channels

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_dim'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of patch {self.patch_size}')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


# DINO's backbones (timm names vit_small_patch16_224, vit_small_patch8_224, vit_base_patch16_224)
# and a tiny one for tests and :runlocal.
CONFIGS = {
  'vit_s16': ViTConfig(),
  'vit_s8': ViTConfig(patch_size=8),
  'vit_b16': ViTConfig(embed_dim=768, num_heads=12, mlp_dim=3072),
  'tiny': ViTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_dim=128),
}


def default_preprocess(config: ViTConfig) -> preprocess_lib.Preprocess:
  """timm's / DINO's input: the trained size, ImageNet mean and std, bicubic resizing."""
  s = config.image_size
  return preprocess_lib.Preprocess((s, s), IMAGENET_MEAN, IMAGENET_STD, 'bicubic')


# ----------------------------------------------------------------------------- shared pieces


def activation(name: str, x: jnp.ndarray) -> jnp.ndarray:
  """'gelu': exact (erf) GELU, PyTorch's nn.GELU(); 'quick_gelu': x * sigmoid(1.702 x) (CLIP)."""
  if name == 'gelu':
    return jax.nn.gelu(x, approximate=False)
  if name == 'quick_gelu':
    return x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f'unknown activation {name!r} (expected one of {ACTIVATIONS})')


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance as PyTorch computes it (the fast E[x^2] - E[x]^2 loses digits when the
  # residual stream's mean is large).
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def resample_grid(pos: jnp.ndarray, old: tuple[int, int], new: tuple[int, int]) -> jnp.ndarray:
  """[old_h * old_w, D] position embeddings -> [new_h * new_w, D] (timm's bicubic resampling).

  ``jax.image.resize``'s antialiased bicubic (Keys a=-0.5, support widened when downsampling,
  taps clipped to the grid and renormalised) is ATen's ``interpolate(mode='bicubic',
  antialias=True, align_corners=False)`` that timm calls, up and down (the tests check both).
  """
  if tuple(old) == tuple(new):
    return pos
  grid = pos.reshape(old[0], old[1], pos.shape[-1])
  out = jax.image.resize(grid, (new[0], new[1], pos.shape[-1]), 'bicubic', antialias=True)
  return out.reshape(new[0] * new[1], pos.shape[-1])


def patch_grid(x: jnp.ndarray, patch: int, what: str) -> tuple[int, int]:
  """The patch grid of x [B, H, W, C]; sides must be multiples of the patch."""
  h, w = x.shape[1:3]
  if h % patch or w % patch:
    raise ValueError(f'{what}: input {h}x{w} is not a multiple of the patch size {patch}')
  return h // patch, w // patch


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (timm's ``Attention``)."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)

  def weights_and_values(self, x):  # x: [B, N, D]
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
    scale = (d // self.heads) ** -0.5
    logits = jnp.einsum('bqhc,bkhc->bhqk', q * scale, k)
    return jax.nn.softmax(logits, axis=-1), v  # [B, heads, N, N], [B, N, heads, head_dim]

  def __call__(self, x):  # x: [B, N, D]
    weights, v = self.weights_and_values(x)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights, v)
    return self.proj(out.reshape(x.shape))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, rngs: nnx.Rngs):
    self.act = act
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.fc2(activation(self.act, self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float, rngs: nnx.Rngs):
    self.norm1 = layer_norm(dim, eps, rngs)
    self.attn = Attention(dim, heads, rngs)
    self.norm2 = layer_norm(dim, eps, rngs)
    self.mlp = Mlp(dim, mlp_dim, act, rngs)

  def __call__(self, x):  # x: [B, N, D]
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def _token_init(shape):
  return lambda key: 0.02 * jax.random.normal(key, shape, jnp.float32)


# ----------------------------------------------------------------------------- the ViT


class ViT(nnx.Module):
  """timm's VisionTransformer with token pooling and no head; x is NHWC, normalised."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.embed_dim, cfg.patch_size
    self.patch_embed = nnx.Conv(
      cfg.channels, d, kernel_size=(p, p), strides=(p, p), padding='VALID', rngs=rngs
    )
    self.cls_token = nnx.Param(_token_init((1, 1, d))(rngs.params()))
    self.pos_embed = nnx.Param(_token_init((1, cfg.grid**2 + 1, d))(rngs.params()))
    self.blocks = nnx.List(
      [Block(d, cfg.num_heads, cfg.mlp_dim, 'gelu', cfg.norm_eps, rngs) for _ in range(cfg.depth)]
    )
    self.norm = layer_norm(d, cfg.norm_eps, rngs)

  def tokens(self, x):
    """x [B, H, W, C] -> tokens [B, 1 + gh * gw, D] (CLS first) entering the blocks."""
    gh, gw = patch_grid(x, self.cfg.patch_size, 'ViT')
    b = x.shape[0]
    patches = self.patch_embed(x.astype(jnp.float32)).reshape(b, gh * gw, self.cfg.embed_dim)
    pos = self.pos_embed[...][0]  # [1 + g * g, D]
    g = self.cfg.grid
    pos = jnp.concatenate([pos[:1], resample_grid(pos[1:], (g, g), (gh, gw))], axis=0)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.cfg.embed_dim))
    return jnp.concatenate([cls, patches], axis=1) + pos[None]

  def features(self, x):
    """[B, 1 + N, D]: the final-normed tokens."""
    h = self.tokens(x)
    for block in self.blocks:
      h = block(h)
    return self.norm(h)

  def embed(self, x):
    """x [B, H, W, C] -> [B, D]: the CLS token after the final norm (timm, num_classes=0)."""
    return self.features(x)[:, 0]

  def cls_attention(self, x):
    """x [B, H, W, C] -> [B, heads, gh * gw]: the last block's CLS attention over the patches."""
    h = self.tokens(x)
    for block in self.blocks[:-1]:
      h = block(h)
    last = self.blocks[-1]
    weights, _ = last.attn.weights_and_values(last.norm1(h))  # [B, heads, 1 + N, 1 + N]
    return weights[:, :, 0, 1:]
