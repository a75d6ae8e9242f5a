"""Stable Diffusion's text-conditioned UNet in Flax NNX: diffusers' ``UNet2DConditionModel`` in the
SD 1.x / 2.x layouts (and their inpainting variants, 9 input channels), computing what diffusers
0.42 computes in evaluation mode.

Layout (diffusers ``models/unets/unet_2d_condition.py``, ``unet_2d_blocks.py``, ``resnet.py``,
``embeddings.py``), with ``n = len(block_out_channels)`` levels:

* ``time_embedding``: the sinusoidal embedding of t (``block_out_channels[0]`` wide; ``[cos, sin]``
  with ``flip_sin_to_cos``, frequencies ``exp(-log(10000) i / (half - freq_shift))``), then
  ``linear_1``, SiLU, ``linear_2`` (width ``time_embedding_dim`` or 4 ``block_out_channels[0]``);
* ``conv_in`` (3x3); ``down_blocks.i`` (``CrossAttnDownBlock2D`` or ``DownBlock2D``):
  ``layers_per_block[i]`` pairs of ``resnets.j`` (``ResnetBlock2D``: GroupNorm, SiLU, 3x3
  ``conv1``, + ``time_emb_proj(silu(temb))``, GroupNorm, SiLU, 3x3 ``conv2``, a 1x1
  ``conv_shortcut`` when the width changes) and, for a cross-attention block, ``attentions.j``
  (``models/transformer2d.py``); every level but the last ends with ``downsamplers.0.conv``
  (3x3 stride 2, padding 1, or 0 before and 1 after with ``downsample_padding=0``);
* ``mid_block`` (``UNetMidBlock2DCrossAttn``): ``resnets.0``, ``attentions.0``, ``resnets.1``;
* ``up_blocks.i`` (``CrossAttnUpBlock2D`` or ``UpBlock2D``) from the widest level:
  ``layers_per_block[n-1-i] + 1`` resnets, each fed the concatenation [h, skip] of the last saved
  down activation, each followed by its transformer in a cross-attention block; every level but
  the last ends with a nearest x2 upsample and ``upsamplers.0.conv`` (3x3);
* ``conv_norm_out`` (GroupNorm), SiLU, ``conv_out`` (3x3).

ResNet GroupNorms have ``norm_num_groups`` groups and epsilon ``norm_eps``. Heads, reproducing
diffusers' naming quirk (its issue #2011): ``num_attention_heads`` must be None and
``attention_head_dim`` (an int, or one value per down block) is the NUMBER of heads; down block i
and the middle (the last value) use ``heads[i]`` / ``heads[-1]``, up block i uses ``heads[n-1-i]``;
a transformer of width C has ``heads`` heads of ``C // heads`` channels (SD 1.x: 8 heads
everywhere; SD 2.x ``[5, 10, 20, 20]``: 64 channels each). ``transformer_layers_per_block`` (an
int or one per down block; up blocks reversed, the middle the last) counts the transformer blocks.

Parameter names are the diffusers state-dict keys without ``.weight``/``.bias`` (``down_blocks.0.
attentions.1.transformer_blocks.0.attn2.to_k``...), so a state dict maps one key at a time.

Arrays are NHWC: latents z ``[B, h, w, in_channels]`` (h and w multiples of ``2 ** (n - 1)``), t
``[B]`` (or a scalar) integer or float timesteps, context ``[B, L, cross_attention_dim]`` (the text
encoder's hidden states); the output ``[B, h, w, out_channels]`` is whatever the model was trained
to predict (epsilon or v: the prediction type is the scheduler's, not the UNet's).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.core import records
from drc_jax.models.transformer2d import Transformer2D, group_norm, linear
from drc_jax.models.unet import timestep_embedding

DOWN_BLOCK_TYPES = {'CrossAttnDownBlock2D': True, 'DownBlock2D': False}  # -> cross-attention
UP_BLOCK_TYPES = {'CrossAttnUpBlock2D': True, 'UpBlock2D': False}

# diffusers 0.42 UNet2DConditionModel.__init__ defaults: every field its config.json may hold.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
  'sample_size': None,
  'in_channels': 4,
  'out_channels': 4,
  'center_input_sample': False,
  'flip_sin_to_cos': True,
  'freq_shift': 0,
  'down_block_types': ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
  'mid_block_type': 'UNetMidBlock2DCrossAttn',
  'up_block_types': ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
  'only_cross_attention': False,
  'block_out_channels': (320, 640, 1280, 1280),
  'layers_per_block': 2,
  'downsample_padding': 1,
  'mid_block_scale_factor': 1,
  'dropout': 0.0,
  'act_fn': 'silu',
  'norm_num_groups': 32,
  'norm_eps': 1e-5,
  'cross_attention_dim': 1280,
  'transformer_layers_per_block': 1,
  'reverse_transformer_layers_per_block': None,
  'encoder_hid_dim': None,
  'encoder_hid_dim_type': None,
  'attention_head_dim': 8,
  'num_attention_heads': None,
  'dual_cross_attention': False,
  'use_linear_projection': False,
  'class_embed_type': None,
  'addition_embed_type': None,
  'addition_time_embed_dim': None,
  'num_class_embeds': None,
  'upcast_attention': False,
  'resnet_time_scale_shift': 'default',
  'resnet_skip_time_act': False,
  'resnet_out_scale_factor': 1.0,
  'time_embedding_type': 'positional',
  'time_embedding_dim': None,
  'time_embedding_act_fn': None,
  'timestep_post_act': None,
  'time_cond_proj_dim': None,
  'conv_in_kernel': 3,
  'conv_out_kernel': 3,
  'projection_class_embeddings_input_dim': None,
  'attention_type': 'default',
  'class_embeddings_concat': False,
  'mid_block_only_cross_attention': None,
  'cross_attention_norm': None,
  'addition_embed_type_num_heads': 64,  # read only with an addition_embed_type (refused)
}
# Fields whose value must be exactly this: anything else computes something this UNet does not.
DIFFUSERS_REQUIRED: dict[str, Any] = {
  'center_input_sample': False,
  'mid_block_type': 'UNetMidBlock2DCrossAttn',
  'mid_block_scale_factor': 1,
  'reverse_transformer_layers_per_block': None,
  'encoder_hid_dim': None,
  'encoder_hid_dim_type': None,
  'num_attention_heads': None,
  'dual_cross_attention': False,
  'class_embed_type': None,
  'addition_embed_type': None,
  'addition_time_embed_dim': None,
  'num_class_embeds': None,
  'resnet_time_scale_shift': 'default',
  'resnet_skip_time_act': False,
  'resnet_out_scale_factor': 1.0,
  'time_embedding_type': 'positional',
  'time_embedding_act_fn': None,
  'timestep_post_act': None,
  'time_cond_proj_dim': None,
  'conv_in_kernel': 3,
  'conv_out_kernel': 3,
  'projection_class_embeddings_input_dim': None,
  'attention_type': 'default',
  'class_embeddings_concat': False,
  'cross_attention_norm': None,
}


def _per_block(value, n: int, field: str) -> tuple[int, ...]:
  """An int or a list of n ints (diffusers' per-down-block settings) as n ints."""
  values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
  if (
    not isinstance(values, (list, tuple))
    or len(values) != n
    or any(type(v) is not int or v < 1 for v in values)
  ):
    raise ValueError(f'unet_cond.{field}: expected a positive int or {n} of them, got {value!r}')
  return tuple(values)


@dataclasses.dataclass(frozen=True)
class UNetCondConfig:
  """Architecture of the conditional UNet (diffusers' fields that shape it, per block resolved).

  ``num_heads[i]`` is the number of heads of down block i (diffusers' ``attention_head_dim``);
  ``layers_per_block`` and ``transformer_layers`` hold one value per down block.
  """

  sample_size: int | None = None  # the latents' side at training (informational)
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] | int = 2  # an int: the same for every block
  down_block_types: tuple[str, ...] = DIFFUSERS_DEFAULTS['down_block_types']
  up_block_types: tuple[str, ...] = DIFFUSERS_DEFAULTS['up_block_types']
  cross_attention_dim: int = 768
  num_heads: tuple[int, ...] | int = 8
  transformer_layers: tuple[int, ...] | int = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  downsample_padding: int = 1
  dtype: str = 'float32'  # compute dtype; parameters stay float32

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name in ('block_out_channels', 'layers_per_block', 'num_heads', 'transformer_layers'):
      object.__setattr__(self, name, _per_block(getattr(self, name), n, name))
    for name, kinds in (('down_block_types', DOWN_BLOCK_TYPES), ('up_block_types', UP_BLOCK_TYPES)):
      types = tuple(getattr(self, name))
      object.__setattr__(self, name, types)
      if len(types) != n or any(t not in kinds for t in types):
        raise ValueError(
          f'unet_cond.{name}: expected {n} of {sorted(kinds)} (one per block_out_channels), got '
          f'{list(types)}'
        )
    boc = self.block_out_channels
    bad = [b for b in boc if b % self.norm_num_groups]
    if bad:
      raise ValueError(
        f'unet_cond.block_out_channels {bad} not divisible by norm_num_groups '
        f'{self.norm_num_groups}'
      )
    if boc[0] % 2:
      raise ValueError(f'unet_cond.block_out_channels[0]={boc[0]} must be even (time embedding)')
    bad = [(w, h) for w, h in zip(boc, self.num_heads) if h > w]
    if bad:
      raise ValueError(f'unet_cond.num_heads: more heads than channels (width, heads) {bad}')
    for name in ('in_channels', 'out_channels', 'cross_attention_dim'):
      if getattr(self, name) < 1:
        raise ValueError(f'unet_cond.{name} must be positive, got {getattr(self, name)}')
    if self.downsample_padding not in (0, 1):
      raise ValueError(f'unet_cond.downsample_padding: only 0 or 1, got {self.downsample_padding}')

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def downsampling_factor(self) -> int:
    """Latent side / deepest feature-map side; the latents' sides must be multiples of it."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> UNetCondConfig:
    """The inverse of ``to_dict`` (unknown keys refused by name)."""
    return records.dataclass_from_dict(cls, d, 'conditional UNet config', ValueError)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @classmethod
  def from_diffusers_config(
    cls, config: Mapping[str, Any], where: str = 'config.json'
  ) -> UNetCondConfig:
    """The config of a diffusers ``UNet2DConditionModel`` ``config.json``.

    Args:
      config: the parsed ``config.json`` (keys starting with ``_`` are metadata).
      where: the file, for messages.

    Returns:
      The UNetCondConfig.

    Raises:
      ValueError: naming the file and the field this UNet does not compute (an unknown field, a
        non-default value of a field in ``DIFFUSERS_REQUIRED``, ``only_cross_attention``...).
    """
    c = records.diffusers_config(
      config, 'UNet2DConditionModel', DIFFUSERS_DEFAULTS, where, ValueError
    )

    def refuse(field, why):
      raise ValueError(f'{where}: unsupported {field}={c[field]!r} ({why})')

    for field, value in DIFFUSERS_REQUIRED.items():
      if c[field] != value:
        refuse(field, f'only {value!r} is supported')
    if c['act_fn'] not in ('silu', 'swish'):
      refuse('act_fn', "only 'silu' is supported")
    oca = c['only_cross_attention']
    if oca is not False and not (isinstance(oca, (list, tuple)) and not any(oca)):
      refuse('only_cross_attention', 'only False (self- then cross-attention) is supported')
    if c['mid_block_only_cross_attention'] not in (None, False):
      refuse('mid_block_only_cross_attention', 'only None or False is supported')
    if c['norm_num_groups'] is None:
      refuse('norm_num_groups', 'GroupNorms are required')
    n = len(c['block_out_channels'])
    heads = c['attention_head_dim']  # diffusers' quirk: the number of heads
    if heads is None:
      refuse('attention_head_dim', 'the number of heads is required')
    cad = c['cross_attention_dim']
    if isinstance(cad, (list, tuple)):
      if len(set(cad)) != 1:
        refuse('cross_attention_dim', 'one width for every block (one context feeds them all)')
      cad = cad[0]
    tlpb = c['transformer_layers_per_block']
    if isinstance(tlpb, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tlpb):
      refuse('transformer_layers_per_block', 'one count per block (nested lists are not supported)')
    size = c['sample_size']
    if isinstance(size, (list, tuple)):
      size = size[0] if len(set(size)) == 1 else None
    if c['time_embedding_dim'] is not None and type(c['time_embedding_dim']) is not int:
      refuse('time_embedding_dim', 'only None or an int')
    try:
      return cls(
        sample_size=None if size is None else int(size),
        in_channels=int(c['in_channels']),
        out_channels=int(c['out_channels']),
        block_out_channels=tuple(c['block_out_channels']),
        layers_per_block=_per_block(c['layers_per_block'], n, 'layers_per_block'),
        down_block_types=tuple(c['down_block_types']),
        up_block_types=tuple(c['up_block_types']),
        cross_attention_dim=int(cad),
        num_heads=_per_block(heads, n, 'attention_head_dim'),
        transformer_layers=_per_block(tlpb, n, 'transformer_layers_per_block'),
        use_linear_projection=bool(c['use_linear_projection']),
        upcast_attention=bool(c['upcast_attention']),
        flip_sin_to_cos=bool(c['flip_sin_to_cos']),
        freq_shift=float(c['freq_shift']),
        time_embedding_dim=c['time_embedding_dim'],
        norm_num_groups=int(c['norm_num_groups']),
        norm_eps=float(c['norm_eps']),
        downsample_padding=int(c['downsample_padding']),
      )
    except (TypeError, ValueError) as e:
      raise ValueError(f'{where}: unsupported architecture ({e})') from e


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype, stride: int = 1, padding=None):
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


class ResnetBlock2D(nnx.Module):
  """diffusers ``ResnetBlock2D`` (``time_embedding_norm='default'``, output scale 1)."""

  def __init__(self, cin: int, cout: int, cfg: UNetCondConfig, dtype, rngs: nnx.Rngs):
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    self.norm1 = group_norm(cin, g, eps, dtype, rngs)
    self.conv1 = _conv(cin, cout, 3, rngs, dtype)
    self.time_emb_proj = linear(cfg.time_embed_dim, cout, rngs, dtype)
    self.norm2 = group_norm(cout, g, eps, dtype, rngs)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.conv_shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None

  def __call__(self, x, temb):  # x: [B, H, W, cin]; temb: [B, T] -> [B, H, W, cout]
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Downsample2D(nnx.Module):
  def __init__(self, ch: int, padding: int, dtype, rngs: nnx.Rngs):
    pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
    self.conv = _conv(ch, ch, 3, rngs, dtype, stride=2, padding=pad)

  def __call__(self, x):  # [B, H, W, C] -> [B, H/2, W/2, C]
    return self.conv(x)


class Upsample2D(nnx.Module):
  def __init__(self, ch: int, dtype, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, rngs, dtype)

  def __call__(self, x):  # [B, H, W, C] -> [B, 2H, 2W, C], nearest then conv
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)


def _transformer(ch: int, heads: int, layers: int, cfg: UNetCondConfig, dtype, rngs):
  return Transformer2D(
    ch,
    heads,
    cfg.cross_attention_dim,
    layers,
    cfg.norm_num_groups,
    cfg.upcast_attention,
    dtype,
    rngs,
  )


class DownBlock(nnx.Module):
  """``CrossAttnDownBlock2D`` or ``DownBlock2D`` number ``i``: resnets [each followed by a
  transformer], [downsampler]; returns the output and the activations the up path concatenates."""

  def __init__(self, cin, cout, i: int, cfg: UNetCondConfig, dtype, rngs: nnx.Rngs):
    layers = cfg.layers_per_block[i]
    self.resnets = nnx.List(
      [ResnetBlock2D(cin if j == 0 else cout, cout, cfg, dtype, rngs) for j in range(layers)]
    )
    cross = DOWN_BLOCK_TYPES[cfg.down_block_types[i]]
    heads, tl = cfg.num_heads[i], cfg.transformer_layers[i]
    self.attentions = (
      nnx.List([_transformer(cout, heads, tl, cfg, dtype, rngs) for _ in range(layers)])
      if cross
      else None
    )
    last = i == len(cfg.block_out_channels) - 1
    self.downsamplers = (
      None if last else nnx.List([Downsample2D(cout, cfg.downsample_padding, dtype, rngs)])
    )

  def __call__(self, x, temb, context):
    saved = []
    for j, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
      saved.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      saved.append(x)
    return x, saved


class MidBlock(nnx.Module):
  """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet at the widest level."""

  def __init__(self, cfg: UNetCondConfig, dtype, rngs: nnx.Rngs):
    ch = cfg.block_out_channels[-1]
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, cfg, dtype, rngs) for _ in range(2)])
    self.attentions = nnx.List(
      [_transformer(ch, cfg.num_heads[-1], cfg.transformer_layers[-1], cfg, dtype, rngs)]
    )

  def __call__(self, x, temb, context):
    x = self.attentions[0](self.resnets[0](x, temb), context)
    return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
  """``CrossAttnUpBlock2D`` or ``UpBlock2D`` number ``i`` (from the widest level)."""

  def __init__(self, i: int, cfg: UNetCondConfig, dtype, rngs: nnx.Rngs):
    rev = list(reversed(cfg.block_out_channels))
    n = len(rev)
    cout, prev, skip_in = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, n - 1)]
    layers = cfg.layers_per_block[n - 1 - i] + 1
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          (prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout),
          cout,
          cfg,
          dtype,
          rngs,
        )
        for j in range(layers)
      ]
    )
    heads, tl = cfg.num_heads[n - 1 - i], cfg.transformer_layers[n - 1 - i]
    self.attentions = (
      nnx.List([_transformer(cout, heads, tl, cfg, dtype, rngs) for _ in range(layers)])
      if UP_BLOCK_TYPES[cfg.up_block_types[i]]
      else None
    )
    self.upsamplers = nnx.List([Upsample2D(cout, dtype, rngs)]) if i != n - 1 else None

  def __call__(self, x, skips, temb, context):  # skips: this block's saved activations, in order
    for j, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - j]], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class TimestepEmbedding(nnx.Module):
  def __init__(self, cfg: UNetCondConfig, dtype, rngs: nnx.Rngs):
    self.dim = cfg.block_out_channels[0]
    self.layout = 'cos_sin' if cfg.flip_sin_to_cos else 'sin_cos'
    self.shift = cfg.freq_shift
    self.linear_1 = linear(self.dim, cfg.time_embed_dim, rngs, dtype)
    self.linear_2 = linear(cfg.time_embed_dim, cfg.time_embed_dim, rngs, dtype)

  def __call__(self, t, dtype):  # t: [B] -> [B, time_embed_dim]
    emb = timestep_embedding(t, self.dim, self.layout, self.shift).astype(dtype)
    return self.linear_2(nnx.silu(self.linear_1(emb)))


class UNet2DCondition(nnx.Module):
  """``__call__(z [B,h,w,in], t [B], context [B,L,D]) -> [B,h,w,out]``."""

  def __init__(self, cfg: UNetCondConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    boc = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, boc[0], 3, rngs, dtype)
    self.time_embedding = TimestepEmbedding(cfg, dtype, rngs)
    self.down_blocks = nnx.List(
      [DownBlock(boc[max(i - 1, 0)], boc[i], i, cfg, dtype, rngs) for i in range(len(boc))]
    )
    self.mid_block = MidBlock(cfg, dtype, rngs)
    self.up_blocks = nnx.List([UpBlock(i, cfg, dtype, rngs) for i in range(len(boc))])
    self.conv_norm_out = group_norm(boc[0], cfg.norm_num_groups, cfg.norm_eps, dtype, rngs)
    self.conv_out = _conv(boc[0], cfg.out_channels, 3, rngs, dtype)

  def __call__(self, z, t, context):
    cfg = self.cfg
    b, h, w, c = z.shape
    f = cfg.downsampling_factor
    if c != cfg.in_channels or h % f or w % f:
      raise ValueError(
        f'unet_cond: latents {z.shape} must be [B, h, w, {cfg.in_channels}] with h and w '
        f'multiples of {f}'
      )
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.cross_attention_dim:
      raise ValueError(
        f'unet_cond: context {context.shape} must be [{b}, L, {cfg.cross_attention_dim}]'
      )
    in_dtype, dtype = z.dtype, jnp.dtype(cfg.dtype)
    z, context = z.astype(dtype), context.astype(dtype)
    temb = self.time_embedding(jnp.broadcast_to(jnp.asarray(t), (b,)), dtype)  # [B, T]
    x = self.conv_in(z)
    skips = [x]
    for block in self.down_blocks:
      x, saved = block(x, temb, context)
      skips += saved
    x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      k = len(block.resnets)
      x = block(x, skips[-k:], temb, context)
      skips = skips[:-k]
    assert not skips
    return self.conv_out(nnx.silu(self.conv_norm_out(x))).astype(in_dtype)


Params = Any  # nested dict of arrays (nnx pure dict)


@dataclasses.dataclass(frozen=True)
class CondUNet:
  """The conditional UNet as (config, graphdef): ``apply`` is a pure function of its params."""

  config: UNetCondConfig
  graphdef: Any

  @classmethod
  def create(cls, config: UNetCondConfig, seed: int = 0) -> tuple[CondUNet, Params]:
    """The model and random initial params (a nested dict of float32 arrays)."""
    graphdef, state = nnx.split(UNet2DCondition(config, nnx.Rngs(params=seed)))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  @classmethod
  def abstract(cls, config: UNetCondConfig) -> tuple[CondUNet, Params]:
    """The model and a params pytree of ShapeDtypeStructs (no allocation)."""
    unet = nnx.eval_shape(lambda: UNet2DCondition(config, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(unet)
    return cls(config, graphdef), nnx.to_pure_dict(state)

  def apply(
    self, params: Params, z: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray
  ) -> jnp.ndarray:
    """The UNet's output (epsilon or v, as trained).

    Args:
      params: the params tree (``create``'s layout; numpy or jax arrays).
      z: [B, h, w, in_channels] latents (inpainting models: the noisy latents, the mask and the
        masked image's latents concatenated, as the pipeline builds them).
      t: [B] or scalar timesteps, integer or float.
      context: [B, L, cross_attention_dim] text embeddings.

    Returns:
      [B, h, w, out_channels] in z's dtype.
    """
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return nnx.merge(self.graphdef, params)(z, t, context)


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: UNetCondConfig) -> tuple[CondUNet, Params]:
  """``CondUNet.abstract(cfg)``, cached per config; do not mutate the shared params tree."""
  return CondUNet.abstract(cfg)
