"""Stable Diffusion's first stage: a Flax NNX KL autoencoder in the diffusers ``AutoencoderKL``
layout, computing what diffusers 0.42 computes.

Layout (diffusers 0.42 ``models/autoencoders/autoencoder_kl.py`` and ``vae.py``):

* ``encoder``: diffusers' ``vae.Encoder`` with ``double_z=True``, the VQ autoencoder's encoder
  (``drc_jax.models.vq.Encoder``: conv_in, down blocks, middle, GroupNorm, SiLU) whose 3x3
  ``conv_out`` gives ``2 * latent_channels`` channels: the posterior mean, then its log-variance.
* ``quant_conv``: 1x1, ``2L -> 2L`` (absent when ``use_quant_conv`` is false, as in SD3 and Flux).
* ``post_quant_conv``: 1x1, ``L -> L`` (absent when ``use_post_quant_conv`` is false).
* ``decoder``: diffusers' ``vae.Decoder`` with ``norm_type='group'``
  (``drc_jax.models.vq.Decoder``).

No codebook. Parameter names are the diffusers module paths with the renames of ``models/vq.py``
(``downsample``/``upsample``/``to_out`` for ``downsamplers.0.conv``/``upsamplers.0.conv``/
``to_out.0``), so a state dict maps one key at a time.

What the functions of ``AutoencoderKL`` compute, in diffusers terms (``vae`` an ``AutoencoderKL``,
no tiling or slicing):

* ``encode(x) = (mean, logvar)`` of ``vae.encode(x).latent_dist``: encoder, [quant_conv], split
  into halves along channels, the log-variance clamped to [-30, 20]
  (``DiagonalGaussianDistribution``).
* ``posterior_mean(x) = vae.encode(x).latent_dist.mean`` (``.mode()``), unscaled.
* ``sample(key, x) = mean + exp(logvar / 2) * N(0, 1)`` (``latent_dist.sample()``), the noise drawn
  from an explicit jax key (so not torch's numbers).
* ``decode(z) = vae.decode(z).sample``: [post_quant_conv], then the decoder; ``z`` unscaled.

A diffusion model works on scaled latents: ``scale_latents`` gives ``(z - shift_factor) *
scaling_factor`` (Stable Diffusion 1/2/XL: ``shift_factor`` 0; SD3 and Flux record one) and
``unscale_latents`` its inverse, what the pipelines apply before ``decode``.

Arrays are NHWC: images ``[B, H, W, in_channels]`` in [-1, 1], latents ``[B, H/f, W/f,
latent_channels]`` with ``f = 2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.core import records
from drc_jax.models import vq as vq_lib

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp

# diffusers 0.42 AutoencoderKL.__init__ defaults; norm_type is not one of its fields (the Decoder
# takes it), accepted only as 'group' so that a 'spatial' config is refused by name.
DIFFUSERS_DEFAULTS = {
  'in_channels': 3,
  'out_channels': 3,
  'down_block_types': ('DownEncoderBlock2D',),
  'up_block_types': ('UpDecoderBlock2D',),
  'block_out_channels': (64,),
  'layers_per_block': 1,
  'act_fn': 'silu',
  'latent_channels': 4,
  'norm_num_groups': 32,
  'sample_size': 32,  # only sizes the tiles of tiled encoding, which we do not do
  'scaling_factor': 0.18215,
  'shift_factor': None,
  'latents_mean': None,
  'latents_std': None,
  'force_upcast': True,  # a float16 hint; we compute in the config's dtype (float32)
  'use_quant_conv': True,
  'use_post_quant_conv': True,
  'mid_block_add_attention': True,
  'norm_type': 'group',
}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Architecture and latent scaling of the KL autoencoder (the diffusers ``AutoencoderKL`` fields
  that shape what it computes). ``shift_factor`` 0.0 is diffusers' ``None`` (no shift)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  down_block_types: tuple[str, ...] = ('DownEncoderBlock2D',)
  up_block_types: tuple[str, ...] = ('UpDecoderBlock2D',)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  dtype: str = 'float32'  # compute dtype of the network; the posterior is computed in float32

  def __post_init__(self):
    for name in ('block_out_channels', 'down_block_types', 'up_block_types'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    boc = self.block_out_channels
    if not boc or any(isinstance(b, bool) or int(b) != b or b < 1 for b in boc):
      raise ValueError(f'autoencoder_kl.block_out_channels: expected positive integers, got {boc}')
    object.__setattr__(self, 'block_out_channels', tuple(int(b) for b in boc))
    for name, kinds in (
      ('down_block_types', vq_lib.DOWN_BLOCK_TYPES),
      ('up_block_types', vq_lib.UP_BLOCK_TYPES),
    ):
      types = getattr(self, name)
      if len(types) != len(boc) or any(t not in kinds for t in types):
        raise ValueError(
          f'autoencoder_kl.{name}: expected {len(boc)} of {sorted(kinds)} (one per '
          f'block_out_channels), got {list(types)}'
        )
    for name in ('in_channels', 'out_channels', 'layers_per_block', 'latent_channels'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'autoencoder_kl.{name}: expected a positive integer, got {value!r}')
    groups = self.norm_num_groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
      raise ValueError(f'autoencoder_kl.norm_num_groups: expected a positive integer, got {groups}')
    bad = [b for b in boc if b % groups]
    if bad:
      raise ValueError(
        f'autoencoder_kl.norm_num_groups: channels {bad} are not divisible by {groups}'
      )
    for name in ('mid_block_add_attention', 'use_quant_conv', 'use_post_quant_conv'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
          f'autoencoder_kl.{name}: expected true or false, got {getattr(self, name)!r}'
        )
    for name, positive in (('scaling_factor', True), ('shift_factor', False)):
      value = getattr(self, name)
      if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (positive and value <= 0)
      ):
        kind = 'a positive number' if positive else 'a finite number'
        raise ValueError(f'autoencoder_kl.{name}: expected {kind}, got {value!r}')
      object.__setattr__(self, name, float(value))
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f'autoencoder_kl.dtype: unknown dtype {self.dtype!r}') from e

  @property
  def downsampling_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def layout(self) -> vq_lib.VQConfig:
    """The shared encoder/decoder's architecture as ``models/vq.py`` takes it (no codebook)."""
    return vq_lib.VQConfig(
      in_channels=self.in_channels,
      out_channels=self.out_channels,
      block_out_channels=self.block_out_channels,
      down_block_types=self.down_block_types,
      up_block_types=self.up_block_types,
      layers_per_block=self.layers_per_block,
      latent_channels=self.latent_channels,
      num_vq_embeddings=1,  # unused: the KL autoencoder has no codebook
      vq_embed_dim=self.latent_channels,
      norm_num_groups=self.norm_num_groups,
      mid_block_add_attention=self.mid_block_add_attention,
      dtype=self.dtype,
    )

  @classmethod
  def from_diffusers_config(
    cls, config: dict[str, Any], where: str = 'config.json'
  ) -> AutoencoderKLConfig:
    """The config of a diffusers ``AutoencoderKL`` ``config.json``, refusing what we do not compute.

    Args:
      config: the parsed ``config.json`` (fields starting with ``_`` are metadata, ignored but
        ``_class_name``, which must be ``AutoencoderKL`` when present).
      where: the file, for messages.

    Returns:
      The config; absent fields take diffusers' defaults (``scaling_factor`` 0.18215).

    Raises:
      ValueError: naming ``where`` and the field: an unknown field, ``norm_type`` other than
        'group', ``act_fn`` other than SiLU, non-null ``latents_mean``/``latents_std`` (per-channel
        latent statistics, which we do not apply), or an invalid value.
    """
    if not isinstance(config, dict):
      raise ValueError(f'{where}: expected a JSON object, found {type(config).__name__}')
    c = records.diffusers_config(config, 'AutoencoderKL', DIFFUSERS_DEFAULTS, where, ValueError)
    if c['norm_type'] != 'group':
      raise ValueError(
        f"{where}: unsupported norm_type={c['norm_type']!r} (only 'group'; 'spatial' is the MoVQ "
        f'decoder)'
      )
    if c['act_fn'] not in ('silu', 'swish'):
      raise ValueError(f"{where}: unsupported act_fn={c['act_fn']!r} (only 'silu')")
    for field in ('latents_mean', 'latents_std'):
      if c[field] is not None:
        raise ValueError(
          f'{where}: unsupported {field}={c[field]!r} (per-channel latent statistics; only null)'
        )
    if c['scaling_factor'] is None:
      raise ValueError(f'{where}: unsupported scaling_factor=None (a positive number)')
    lists = ('block_out_channels', 'down_block_types', 'up_block_types')
    for field in lists:
      if not isinstance(c[field], (list, tuple)):
        raise ValueError(f'{where}: {field} must be a list, got {c[field]!r}')
    try:
      return cls(
        in_channels=c['in_channels'],
        out_channels=c['out_channels'],
        block_out_channels=tuple(c['block_out_channels']),
        down_block_types=tuple(c['down_block_types']),
        up_block_types=tuple(c['up_block_types']),
        layers_per_block=c['layers_per_block'],
        latent_channels=c['latent_channels'],
        norm_num_groups=c['norm_num_groups'],
        mid_block_add_attention=c['mid_block_add_attention'],
        use_quant_conv=c['use_quant_conv'],
        use_post_quant_conv=c['use_post_quant_conv'],
        scaling_factor=c['scaling_factor'],
        shift_factor=0.0 if c['shift_factor'] is None else c['shift_factor'],
      )
    except (TypeError, ValueError) as e:
      raise ValueError(f'{where}: unsupported architecture ({e})') from e

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> AutoencoderKLConfig:
    return records.dataclass_from_dict(cls, d, 'autoencoder_kl config', ValueError)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for name in ('block_out_channels', 'down_block_types', 'up_block_types'):
      d[name] = list(d[name])
    return d


def _conv1x1(cin: int, cout: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(
    cin, cout, kernel_size=(1, 1), bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
  )


class KLAutoencoder(nnx.Module):
  """``moments(x) -> [mean | logvar]`` (before the clamp), ``decode(z) -> x``."""

  def __init__(self, cfg: AutoencoderKLConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    layout = cfg.layout
    width = cfg.latent_channels
    self.encoder = vq_lib.Encoder(layout, dtype, rngs, double_z=True)
    self.quant_conv = _conv1x1(2 * width, 2 * width, dtype, rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv1x1(width, width, dtype, rngs) if cfg.use_post_quant_conv else None
    self.decoder = vq_lib.Decoder(layout, dtype, rngs)

  def moments(self, x):  # [B, H, W, in] -> [B, H/f, W/f, 2L] float32
    h = self.encoder(x.astype(jnp.dtype(self.cfg.dtype)))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    return h.astype(jnp.float32)

  def decode(self, z):  # [B, h, w, L] -> [B, h*f, w*f, out]
    in_dtype = z.dtype
    z = z.astype(jnp.dtype(self.cfg.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(in_dtype)


Params = Any


@dataclasses.dataclass(frozen=True)
class AutoencoderKL:
  """A KL autoencoder as (config, graphdef): pure functions of a params pytree, for jit."""

  config: AutoencoderKLConfig
  graphdef: Any

  @classmethod
  def create(cls, config: AutoencoderKLConfig, seed: int = 0) -> tuple[AutoencoderKL, Params]:
    """The model and freshly initialised params (zero biases, Flax's default kernels)."""
    graphdef, state = nnx.split(KLAutoencoder(config, nnx.Rngs(params=seed)))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  @classmethod
  def abstract(cls, config: AutoencoderKLConfig) -> tuple[AutoencoderKL, Params]:
    """The model and a params pytree of ShapeDtypeStructs (no allocation)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: KLAutoencoder(config, nnx.Rngs(params=0))))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  def encode(self, params: Params, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The posterior ``q(z | x)`` as diffusers' ``vae.encode(x).latent_dist`` holds it.

    Args:
      params: the params pytree.
      x: [B, H, W, in_channels] images in [-1, 1].

    Returns:
      (mean, logvar), each [B, H/f, W/f, latent_channels] float32; logvar clamped to [-30, 20].
    """
    moments = nnx.merge(self.graphdef, params).moments(x)  # [B, h, w, 2L]
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def posterior_mean(self, params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, in] images -> [B, H/f, W/f, L] ``vae.encode(x).latent_dist.mean`` (unscaled)."""
    return self.encode(params, x)[0]

  def sample(self, params: Params, key: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    """A latent drawn from the posterior: ``mean + exp(logvar / 2) * noise``.

    Args:
      params: the params pytree.
      key: the jax random key of the noise (one standard normal per latent value).
      x: [B, H, W, in_channels] images in [-1, 1].

    Returns:
      [B, H/f, W/f, latent_channels] float32 latents (unscaled).
    """
    mean, logvar = self.encode(params, x)
    noise = jax.random.normal(key, mean.shape, jnp.float32)  # [B, h, w, L]
    return mean + jnp.exp(0.5 * logvar) * noise

  def decode(self, params: Params, z: jnp.ndarray) -> jnp.ndarray:
    """[B, h, w, L] unscaled latents -> [B, h*f, w*f, out] images: ``vae.decode(z).sample``."""
    return nnx.merge(self.graphdef, params).decode(z)


def scale_latents(cfg: AutoencoderKLConfig, z: jnp.ndarray) -> jnp.ndarray:
  """[B, h, w, L] encoder latents -> the diffusion model's: ``(z - shift) * scaling``."""
  return (z - cfg.shift_factor) * cfg.scaling_factor


def unscale_latents(cfg: AutoencoderKLConfig, z: jnp.ndarray) -> jnp.ndarray:
  """[B, h, w, L] diffusion latents -> ``decode``'s input: ``z / scaling + shift``."""
  return z / cfg.scaling_factor + cfg.shift_factor


@functools.lru_cache(maxsize=4)
def abstract_autoencoder_kl(cfg: AutoencoderKLConfig) -> tuple[AutoencoderKL, Params]:
  """``AutoencoderKL.abstract(cfg)``, cached per config; do not mutate the shared params tree."""
  return AutoencoderKL.abstract(cfg)
