"""The first stage of a latent diffusion target: a Flax NNX VQ autoencoder in the diffusers
``VQModel`` layout (the taming-transformers / CompVis LDM ``VQModelInterface``).

Layout (diffusers 0.42 ``models/autoencoders/vq_model.py`` and ``vae.py``):

* ``encoder``: 3x3 ``conv_in``; per level ``i`` a down block of ``layers_per_block`` residual
  blocks at ``block_out_channels[i]`` channels (each followed by one-head self-attention for an
  ``AttnDownEncoderBlock2D``) and, except at the last level, a stride-2 3x3 conv after padding 0
  before and 1 after (``downsample``); a middle of ResBlock, [attention], ResBlock; GroupNorm,
  SiLU and a 3x3 ``conv_out`` to ``latent_channels``.
* ``quant_conv`` (1x1, latent -> codebook width), the codebook ``quantize.embedding``
  ``[num_vq_embeddings, vq_embed_dim]``, ``post_quant_conv`` (1x1, back to the latent width).
* ``decoder``: 3x3 ``conv_in``, the middle, up blocks from the widest level down with
  ``layers_per_block + 1`` residual blocks (and attention for ``AttnUpDecoderBlock2D``), a nearest
  x2 upsample and 3x3 conv except after the last, GroupNorm, SiLU, 3x3 ``conv_out``.

Every GroupNorm has ``norm_num_groups`` groups and epsilon 1e-6; residual blocks carry no time
embedding; attention has one head over all channels (diffusers passes the block width as
``attention_head_dim``). Parameter names are the diffusers module paths (``encoder.down_blocks.0.
resnets.1.conv2``...), with ``downsample``/``upsample``/``to_out`` for diffusers'
``downsamplers.0.conv``/``upsamplers.0.conv``/``to_out.0``, so a state dict maps one key at a time.

What the two functions compute, in diffusers terms:

* ``encode(x) = vq.encode(x).latents``: encoder then ``quant_conv``, *before* quantisation (what
  ``LDMPipeline``-style inversion and DRC need: the UNet was trained on these latents times the
  pipeline's scaling factor).
* ``decode(z) = vq.decode(z).sample`` with its defaults (``force_not_quantize=False``): every latent
  vector is replaced by its nearest codebook vector (Euclidean; ``z + (e - z)`` as diffusers'
  straight-through form computes it), then ``post_quant_conv`` and the decoder. This is the call
  ``LDMPipeline`` makes (``self.vqvae.decode(latents).sample`` after dividing by the scaling
  factor). The nearest vector is found with float32 matmuls at full precision; a latent almost
  equidistant to two codebook vectors (distances equal to float32 rounding) may pick the other one
  than torch's ``cdist`` does.

Arrays are NHWC: images ``[B, H, W, in_channels]`` in [-1, 1], latents ``[B, H/f, W/f,
vq_embed_dim]`` (the codebook width, which is ``latent_channels`` unless the config says otherwise)
with ``f = 2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.core import records
from drc_jax.models.unet import multihead_attention

DOWN_BLOCK_TYPES = {'DownEncoderBlock2D': False, 'AttnDownEncoderBlock2D': True}  # -> attention
UP_BLOCK_TYPES = {'UpDecoderBlock2D': False, 'AttnUpDecoderBlock2D': True}
NORM_EPS = 1e-6  # diffusers' Encoder and Decoder fix every epsilon to 1e-6


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """Architecture of the VQ autoencoder (the diffusers ``VQModel`` fields that shape it)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  down_block_types: tuple[str, ...] = ('DownEncoderBlock2D',)
  up_block_types: tuple[str, ...] = ('UpDecoderBlock2D',)
  layers_per_block: int = 1
  latent_channels: int = 3
  num_vq_embeddings: int = 256
  vq_embed_dim: int = 3  # codebook width (diffusers: None means latent_channels)
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  dtype: str = 'float32'  # compute dtype of the convolutions; the codebook search stays float32

  def __post_init__(self):
    for name in ('block_out_channels', 'down_block_types', 'up_block_types'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    boc = self.block_out_channels
    if not boc or any(int(b) != b or b < 1 for b in boc):
      raise ValueError(f'vq.block_out_channels: expected positive integers, got {boc}')
    object.__setattr__(self, 'block_out_channels', tuple(int(b) for b in boc))
    for name, kinds in (('down_block_types', DOWN_BLOCK_TYPES), ('up_block_types', UP_BLOCK_TYPES)):
      types = getattr(self, name)
      if len(types) != len(boc) or any(t not in kinds for t in types):
        raise ValueError(
          f'vq.{name}: expected {len(boc)} of {sorted(kinds)} (one per block_out_channels), '
          f'got {list(types)}'
        )
    bad = [b for b in boc if b % self.norm_num_groups]
    if bad:
      raise ValueError(
        f'vq: channels {bad} not divisible by norm_num_groups {self.norm_num_groups}'
      )
    for name in ('in_channels', 'out_channels', 'layers_per_block', 'latent_channels'):
      if getattr(self, name) < 1:
        raise ValueError(f'vq.{name} must be positive, got {getattr(self, name)}')
    if self.num_vq_embeddings < 1 or self.vq_embed_dim < 1:
      raise ValueError('vq.num_vq_embeddings and vq.vq_embed_dim must be positive')

  @property
  def downsampling_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> VQConfig:
    return records.dataclass_from_dict(cls, d, 'autoencoder config', ValueError)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for name in ('block_out_channels', 'down_block_types', 'up_block_types'):
      d[name] = list(d[name])
    return d


def _conv(cin, cout, k, rngs, dtype, stride=1, padding=None):
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(k, k),
    strides=(stride, stride),
    padding=padding if padding is not None else ((k // 2, k // 2),) * 2,
    bias_init=nnx.initializers.zeros,
    dtype=dtype,
    rngs=rngs,
  )


def _norm(ch, cfg: VQConfig, dtype, rngs):
  return nnx.GroupNorm(ch, num_groups=cfg.norm_num_groups, epsilon=NORM_EPS, dtype=dtype, rngs=rngs)


def _linear(cin, cout, rngs, dtype):
  return nnx.Linear(cin, cout, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """diffusers ``ResnetBlock2D`` without time embedding: norm-SiLU-conv twice, plus shortcut."""

  def __init__(self, cin: int, cout: int, cfg: VQConfig, dtype, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, cfg, dtype, rngs)
    self.conv1 = _conv(cin, cout, 3, rngs, dtype)
    self.norm2 = _norm(cout, cfg, dtype, rngs)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.conv_shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None

  def __call__(self, x):  # [B, H, W, cin] -> [B, H, W, cout]
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nnx.Module):
  """diffusers ``Attention`` as the VAE blocks use it: GroupNorm, one head, residual."""

  def __init__(self, ch: int, cfg: VQConfig, dtype, rngs: nnx.Rngs):
    self.group_norm = _norm(ch, cfg, dtype, rngs)
    self.to_q = _linear(ch, ch, rngs, dtype)
    self.to_k = _linear(ch, ch, rngs, dtype)
    self.to_v = _linear(ch, ch, rngs, dtype)
    self.to_out = _linear(ch, ch, rngs, dtype)

  def __call__(self, x):  # [B, H, W, C]
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    attended = multihead_attention(self.to_q(y), self.to_k(y), self.to_v(y), 1)  # [B, HW, C]
    return x + self.to_out(attended).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Pad 0 before and 1 after, then a stride-2 3x3 conv (diffusers ``downsample_padding=0``)."""

  def __init__(self, ch: int, dtype, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, rngs, dtype, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, ch: int, dtype, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, rngs, dtype)

  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)


class Block(nnx.Module):
  """One level: residual blocks, each with optional attention, then an optional resampler."""

  def __init__(self, cin, cout, layers, attention, resample, cfg: VQConfig, dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List(
      [ResnetBlock(cin if i == 0 else cout, cout, cfg, dtype, rngs) for i in range(layers)]
    )
    self.attentions = (
      nnx.List([Attention(cout, cfg, dtype, rngs) for _ in range(layers)]) if attention else None
    )
    self.downsample = Downsample(cout, dtype, rngs) if resample == 'down' else None
    self.upsample = Upsample(cout, dtype, rngs) if resample == 'up' else None

  def __call__(self, x):
    for i, resnet in enumerate(self.resnets):
      x = resnet(x)
      if self.attentions is not None:
        x = self.attentions[i](x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


class MidBlock(nnx.Module):
  """ResBlock, [one-head attention], ResBlock at the widest level (diffusers ``UNetMidBlock2D``)."""

  def __init__(self, ch: int, cfg: VQConfig, dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(ch, ch, cfg, dtype, rngs) for _ in range(2)])
    self.attentions = (
      nnx.List([Attention(ch, cfg, dtype, rngs)]) if cfg.mid_block_add_attention else None
    )

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """diffusers' ``vae.Encoder``; ``double_z`` doubles ``conv_out``'s width (the KL autoencoder's
  mean and log-variance), as diffusers' flag of that name does."""

  def __init__(self, cfg: VQConfig, dtype, rngs: nnx.Rngs, double_z: bool = False):
    boc = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, boc[0], 3, rngs, dtype)
    self.down_blocks = nnx.List(
      [
        Block(
          boc[max(i - 1, 0)],
          boc[i],
          cfg.layers_per_block,
          DOWN_BLOCK_TYPES[kind],
          'down' if i != len(boc) - 1 else None,
          cfg,
          dtype,
          rngs,
        )
        for i, kind in enumerate(cfg.down_block_types)
      ]
    )
    self.mid_block = MidBlock(boc[-1], cfg, dtype, rngs)
    self.conv_norm_out = _norm(boc[-1], cfg, dtype, rngs)
    self.conv_out = _conv(boc[-1], (2 if double_z else 1) * cfg.latent_channels, 3, rngs, dtype)

  def __call__(self, x):  # [B, H, W, in] -> [B, H/f, W/f, latent (x2 if double_z)]
    h = self.conv_in(x)
    for block in self.down_blocks:
      h = block(h)
    h = self.mid_block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VQConfig, dtype, rngs: nnx.Rngs):
    rev = list(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg.latent_channels, rev[0], 3, rngs, dtype)
    self.mid_block = MidBlock(rev[0], cfg, dtype, rngs)
    self.up_blocks = nnx.List(
      [
        Block(
          rev[max(i - 1, 0)],
          rev[i],
          cfg.layers_per_block + 1,
          UP_BLOCK_TYPES[kind],
          'up' if i != len(rev) - 1 else None,
          cfg,
          dtype,
          rngs,
        )
        for i, kind in enumerate(cfg.up_block_types)
      ]
    )
    self.conv_norm_out = _norm(rev[-1], cfg, dtype, rngs)
    self.conv_out = _conv(rev[-1], cfg.out_channels, 3, rngs, dtype)

  def __call__(self, z):  # [B, h, w, latent] -> [B, h*f, w*f, out]
    h = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      h = block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


def nearest_codes(codebook: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
  """Index of the nearest codebook vector (Euclidean) for every latent vector.

  Args:
    codebook: [K, D] float32.
    z: [B, h, w, D].

  Returns:
    [B, h, w] int32 indices. Distances are ``|e|^2 - 2 z.e`` (``|z|^2`` is the same for every
    code), one image at a time so the [h*w, K] table stays small (64*64 x 8192 floats = 128 MiB).
  """
  b, h, w, d = z.shape
  e2 = jnp.sum(codebook * codebook, axis=-1)  # [K]

  def one(zi):  # [h*w, D] -> [h*w]
    dots = jnp.dot(zi, codebook.T, precision=jax.lax.Precision.HIGHEST)  # [h*w, K]
    return jnp.argmin(e2[None, :] - 2.0 * dots, axis=-1).astype(jnp.int32)

  return jax.lax.map(one, z.reshape(b, h * w, d)).reshape(b, h, w)


class Quantizer(nnx.Module):
  """The codebook ``embedding`` [K, D] (diffusers ``VectorQuantizer.embedding.weight``)."""

  def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
    k = cfg.num_vq_embeddings
    init = nnx.initializers.uniform(scale=2.0 / k)  # U(0, 2/K) - 1/K: diffusers' U(-1/K, 1/K)
    self.embedding = nnx.Param(init(rngs.params(), (k, cfg.vq_embed_dim)) - 1.0 / k)

  def __call__(self, z):  # [B, h, w, D] float32 -> (quantised [B, h, w, D], indices [B, h, w])
    codebook = self.embedding[...]
    idx = nearest_codes(codebook, z)
    return z + (codebook[idx] - z), idx


class VQAutoencoder(nnx.Module):
  """``encode(x) -> z`` (before quantisation), ``decode(z) -> x`` (quantising first)."""

  def __init__(self, cfg: VQConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, dtype, rngs)
    self.quant_conv = _conv(cfg.latent_channels, cfg.vq_embed_dim, 1, rngs, dtype)
    self.quantize = Quantizer(cfg, rngs)
    self.post_quant_conv = _conv(cfg.vq_embed_dim, cfg.latent_channels, 1, rngs, dtype)
    self.decoder = Decoder(cfg, dtype, rngs)

  def encode(self, x):
    in_dtype = x.dtype
    z = self.quant_conv(self.encoder(x.astype(jnp.dtype(self.cfg.dtype))))
    return z.astype(in_dtype)

  def decode(self, z):
    in_dtype = z.dtype
    quantised, _ = self.quantize(z.astype(jnp.float32))
    x = self.decoder(self.post_quant_conv(quantised.astype(jnp.dtype(self.cfg.dtype))))
    return x.astype(in_dtype)


Params = Any


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """A VQ autoencoder as (config, graphdef): pure functions of a params pytree, for jit."""

  config: VQConfig
  graphdef: Any

  @classmethod
  def create(cls, config: VQConfig, seed: int = 0) -> tuple[Autoencoder, Params]:
    graphdef, state = nnx.split(VQAutoencoder(config, nnx.Rngs(params=seed)))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  @classmethod
  def abstract(cls, config: VQConfig) -> tuple[Autoencoder, Params]:
    """The model and a params pytree of ShapeDtypeStructs (no allocation)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VQAutoencoder(config, nnx.Rngs(params=0))))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  def encode(self, params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, in_channels] images in [-1, 1] -> [B, H/f, W/f, vq_embed_dim] latents."""
    return nnx.merge(self.graphdef, params).encode(x)

  def decode(self, params: Params, z: jnp.ndarray) -> jnp.ndarray:
    """[B, h, w, vq_embed_dim] latents -> [B, h*f, w*f, out_channels] images (about [-1, 1])."""
    return nnx.merge(self.graphdef, params).decode(z)

  def codes(self, params: Params, z: jnp.ndarray) -> jnp.ndarray:
    """[B, h, w] indices of the codebook vectors ``decode`` replaces ``z`` with."""
    return nearest_codes(jnp.asarray(params['quantize']['embedding'], jnp.float32), z)


@functools.lru_cache(maxsize=4)
def abstract_autoencoder(cfg: VQConfig) -> tuple[Autoencoder, Params]:
  """``Autoencoder.abstract(cfg)``, cached per config; do not mutate the shared params tree."""
  return Autoencoder.abstract(cfg)
