"""The cross-attention transformer of Stable Diffusion's UNet in Flax NNX: diffusers'
``Transformer2DModel`` on continuous inputs with ``BasicTransformerBlock``s (``norm_type=
'layer_norm'``, ``activation_fn='geglu'``, ``attention_bias=False``, ``attention_type='default'``).

Layout (diffusers 0.42 ``models/transformers/transformer_2d.py``, ``models/attention.py``,
``models/attention_processor.py``, ``models/activations.py``), for an input of C channels with
``heads`` heads of ``head_dim = C // heads`` channels (``inner = heads * head_dim``):

* ``norm``: GroupNorm(``norm_num_groups``, C), epsilon 1e-6;
* ``proj_in``: C -> inner (a 1x1 conv in SD 1.x, a Linear with ``use_linear_projection``; both are
  the same matrix per pixel, so ours is a Linear and the converter reads either layout);
* ``transformer_blocks.N``: ``x += attn1(norm1(x))`` (self-attention), ``x += attn2(norm2(x),
  context)`` (cross-attention on the text embeddings), ``x += ff(norm3(x))``; LayerNorms with
  epsilon 1e-5; ``to_q``/``to_k``/``to_v`` without bias, ``to_out.0`` with bias; softmax attention
  with logits scaled by ``head_dim ** -0.5``; the GEGLU feed-forward ``ff.net.0.proj`` (dim -> 2 *
  4 dim, split into hidden and gate: ``hidden * gelu(gate)``, exact erf GELU) and ``ff.net.2``
  (4 dim -> dim);
* ``proj_out``: inner -> C, then the residual ``x + out``.

Parameter names are diffusers' module paths (``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``: list
entries without parameters hold a rate-0 dropout), so a state dict maps one key at a time. Arrays
are NHWC: x ``[B, H, W, C]``, context ``[B, L, cross_attention_dim]``. The forward pass is
diffusers' in evaluation mode (no dropout, no attention masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.models.unet import multihead_attention

TRANSFORMER_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's norm_eps default (the UNet never changes it)


def linear(cin: int, cout: int, rngs: nnx.Rngs, dtype, bias: bool = True) -> nnx.Linear:
  """A Linear of torch's ``nn.Linear`` shape ([in, out] kernel, optional bias)."""
  return nnx.Linear(
    cin, cout, use_bias=bias, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
  )


def group_norm(ch: int, groups: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """torch's GroupNorm: biased variance computed as E[(x - mean)^2]."""
  return nnx.GroupNorm(
    ch, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs
  )


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  """diffusers ``Attention`` (``bias=False``): ``to_out.0(softmax(q k^T / sqrt(d)) v)``."""

  def __init__(
    self, dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool, dtype, rngs
  ):
    inner = heads * head_dim
    self.heads, self.upcast = heads, upcast
    self.to_q = linear(dim, inner, rngs, dtype, bias=False)
    self.to_k = linear(context_dim, inner, rngs, dtype, bias=False)
    self.to_v = linear(context_dim, inner, rngs, dtype, bias=False)
    self.to_out = nnx.List([linear(inner, dim, rngs, dtype), nnx.Dropout(0.0)])

  def __call__(self, x, context=None):  # x: [B, N, dim]; context: [B, L, context_dim] or None
    ctx = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)  # [B, N|L, inner]
    if self.upcast:  # upcast_attention: q k^T in float32 (a no-op when computing in float32)
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    attended = multihead_attention(q, k, v, self.heads).astype(x.dtype)  # [B, N, inner]
    return self.to_out[0](attended)


class GEGLU(nnx.Module):
  """``proj`` to 2 * inner, split [hidden, gate]: ``hidden * gelu(gate)`` (erf GELU)."""

  def __init__(self, dim: int, inner: int, dtype, rngs: nnx.Rngs):
    self.proj = linear(dim, 2 * inner, rngs, dtype)

  def __call__(self, x):  # [B, N, dim] -> [B, N, inner]
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """diffusers ``FeedForward`` (geglu, mult 4): ``net.0`` GEGLU, ``net.1`` dropout, ``net.2``."""

  def __init__(self, dim: int, dtype, rngs: nnx.Rngs):
    inner = 4 * dim
    self.net = nnx.List(
      [GEGLU(dim, inner, dtype, rngs), nnx.Dropout(0.0), linear(inner, dim, rngs, dtype)]
    )

  def __call__(self, x):  # [B, N, dim]
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Self-attention, cross-attention and feed-forward, each pre-LayerNorm and residual."""

  def __init__(
    self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool, dtype, rngs
  ):
    self.norm1 = _layer_norm(dim, dtype, rngs)
    self.attn1 = Attention(dim, dim, heads, head_dim, upcast, dtype, rngs)
    self.norm2 = _layer_norm(dim, dtype, rngs)
    self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast, dtype, rngs)
    self.norm3 = _layer_norm(dim, dtype, rngs)
    self.ff = FeedForward(dim, dtype, rngs)

  def __call__(self, x, context):  # x: [B, N, dim]; context: [B, L, context_dim]
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
  """diffusers ``Transformer2DModel`` on a feature map: norm, proj_in, blocks, proj_out, residual.

  Args of the constructor: ``ch`` the input width, ``heads`` the number of heads (each
  ``ch // heads`` wide, as the UNet's blocks build it), ``context_dim`` the text embeddings'
  width, ``layers`` the number of transformer blocks, ``groups`` the GroupNorm's groups.
  """

  def __init__(
    self,
    ch: int,
    heads: int,
    context_dim: int,
    layers: int,
    groups: int,
    upcast: bool,
    dtype,
    rngs: nnx.Rngs,
  ):
    head_dim = ch // heads
    inner = heads * head_dim
    self.norm = group_norm(ch, groups, TRANSFORMER_NORM_EPS, dtype, rngs)
    self.proj_in = linear(ch, inner, rngs, dtype)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast, dtype, rngs)
        for _ in range(layers)
      ]
    )
    self.proj_out = linear(inner, ch, rngs, dtype)

  def __call__(self, x, context):  # x: [B, H, W, C]; context: [B, L, context_dim]
    b, h, w, c = x.shape
    y = self.proj_in(self.norm(x).reshape(b, h * w, c))  # [B, HW, inner]
    for block in self.transformer_blocks:
      y = block(y, context)
    return x + self.proj_out(y).reshape(b, h, w, c)
