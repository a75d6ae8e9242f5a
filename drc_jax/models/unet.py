"""The target diffusion model: a Flax NNX UNet in the pytorch-ddpm / DDPM-CIFAR10 layout.

Layout (Ho et al. 2020; the pytorch-ddpm project; diffusers ``UNet2DModel`` in the
google/ddpm-cifar10-32 layout): a 3x3 ``head`` conv; for each level ``i`` of ``ch_mult``,
``num_res_blocks`` residual blocks at ``ch * ch_mult[i]`` channels (with self-attention when the
level's resolution is in ``attn_res``) and a stride-2 downsample except at the last level; a middle
of ResBlock+attention, ResBlock; the mirrored up path with ``num_res_blocks + 1`` blocks per level
fed with the skip activations; GroupNorm, SiLU and a 3x3 ``tail`` conv. The timestep enters through
a sinusoidal embedding and a 2-layer MLP of width ``4 * ch``. Attention has one head (DDPM) or,
with ``attn_head_dim``, ``width // attn_head_dim`` heads (the CompVis LDM UNets, diffusers
``attention_head_dim``).

Parameter names follow pytorch-ddpm (``head``, ``downblocks.N``, ``middleblocks.N``,
``upblocks.N``, ``tail``), so a PyTorch state dict maps onto them one key at a time. Where the two
public PyTorch layouts compute differently (the order of sin/cos in the time embedding, its
frequency shift, the downsampling padding, the GroupNorm epsilon) the model takes an option.

Arrays are NHWC: x is ``[B, H, W, C]`` in [-1, 1]; t is ``[B]`` integer (or float) timesteps; the
output is the epsilon prediction ``[B, H, W, C]``.
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


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the UNet (everything needed to rebuild it; saved beside checkpoints)."""

  resolution: int = 32
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_res: tuple[int, ...] = (16,)
  dropout: float = 0.1
  norm_groups: int = 32
  norm_eps: float = 1e-5
  # 'interleaved': [sin f0, cos f0, sin f1, ...] (pytorch-ddpm); 'sin_cos': [sin..., cos...]
  # (diffusers, flip_sin_to_cos=False); 'cos_sin': [cos..., sin...] (flip_sin_to_cos=True).
  time_embed_layout: str = 'interleaved'
  # Frequencies exp(-log(10000) i / (half - freq_shift)); pytorch-ddpm 0, diffusers DDPM 1.
  time_freq_shift: int = 0
  # 'symmetric': pad 1 on every side (pytorch-ddpm); 'asymmetric': pad 0 before, 1 after
  # (diffusers with downsample_padding=0).
  downsample_padding: str = 'symmetric'
  # Channels per attention head: None = one head over all channels (pytorch-ddpm, DDPM); an int d
  # splits every attention block of width C into C // d heads (diffusers attention_head_dim,
  # the openai/LDM num_head_channels). Written to model.json only when set.
  attn_head_dim: int | None = None
  dtype: str = 'float32'  # compute dtype ('bfloat16' on TPU); parameters stay float32

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'attn_res', tuple(int(r) for r in self.attn_res))
    if self.time_embed_layout not in ('interleaved', 'sin_cos', 'cos_sin'):
      raise ValueError(f'model.time_embed_layout: unknown {self.time_embed_layout!r}')
    if self.downsample_padding not in ('symmetric', 'asymmetric'):
      raise ValueError(f'model.downsample_padding: unknown {self.downsample_padding!r}')
    if self.resolution % (2 ** (len(self.ch_mult) - 1)):
      raise ValueError(
        f'model.resolution {self.resolution} is not divisible by '
        f'2^{len(self.ch_mult) - 1} (len(ch_mult) - 1 downsamplings)'
      )
    for m in self.ch_mult:
      if (self.ch * m) % self.norm_groups:
        raise ValueError(
          f'model: channels {self.ch * m} not divisible by norm_groups {self.norm_groups}'
        )
    if self.ch % 2:
      raise ValueError('model.ch must be even (sinusoidal embedding)')
    if self.attn_head_dim is not None:
      object.__setattr__(self, 'attn_head_dim', int(self.attn_head_dim))
      if self.attn_head_dim < 1:
        raise ValueError(f'model.attn_head_dim must be positive, got {self.attn_head_dim}')
      widths = {self.ch * self.ch_mult[-1]} | {
        self.ch * m for i, m in enumerate(self.ch_mult) if self.resolution // 2**i in self.attn_res
      }
      bad = sorted(w for w in widths if w % self.attn_head_dim)
      if bad:
        raise ValueError(
          f'model.attn_head_dim {self.attn_head_dim} does not divide the attention widths {bad}'
        )

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
    return records.dataclass_from_dict(cls, d, 'model config', ValueError)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['ch_mult'], d['attn_res'] = list(self.ch_mult), list(self.attn_res)
    if d['attn_head_dim'] is None:  # single-head targets keep the model.json they always had
      del d['attn_head_dim']
    return d


def timestep_embedding(t: jnp.ndarray, dim: int, layout: str, freq_shift: int) -> jnp.ndarray:
  """Sinusoidal embedding [B, dim] of timesteps t [B]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  sin, cos = jnp.sin(args), jnp.cos(args)
  if layout == 'interleaved':
    return jnp.stack([sin, cos], axis=-1).reshape(t.shape[0], dim)
  if layout == 'sin_cos':
    return jnp.concatenate([sin, cos], axis=-1)
  return jnp.concatenate([cos, sin], axis=-1)


def _conv(cin, cout, k, rngs, dtype, scale=1.0, stride=1, padding=None):
  init = nnx.initializers.variance_scaling(scale, 'fan_avg', 'uniform')  # xavier_uniform * scale
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(k, k),
    strides=(stride, stride),
    padding=padding if padding is not None else ((k // 2, k // 2),) * 2,
    kernel_init=init,
    bias_init=nnx.initializers.zeros,
    dtype=dtype,
    rngs=rngs,
  )


def _dense(cin, cout, rngs, dtype, scale=1.0):
  init = nnx.initializers.variance_scaling(scale, 'fan_avg', 'uniform')
  return nnx.Linear(
    cin, cout, kernel_init=init, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
  )


def multihead_attention(q, k, v, num_heads: int) -> jnp.ndarray:
  """Softmax attention of q, k, v [B, N, C] split into ``num_heads`` heads of C // num_heads
  channels (head-major: channel h * d + j is channel j of head h, as diffusers and torch's
  ``view(B, N, heads, d)`` split them); logits scaled by d^-0.5, softmax in float32."""
  b, n, c = q.shape
  d = c // num_heads
  q, k, v = (a.reshape(b, a.shape[1], num_heads, d) for a in (q, k, v))  # [B, N, heads, d]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (d**-0.5)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, c)


class AttnBlock(nnx.Module):
  """Self-attention over all positions (one head, or ``cfg.attn_head_dim`` channels per head),
  with a residual connection."""

  def __init__(self, ch: int, cfg: UNetConfig, dtype, rngs: nnx.Rngs):
    self.num_heads = ch // cfg.attn_head_dim if cfg.attn_head_dim else 1
    self.norm = nnx.GroupNorm(
      ch, num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs
    )
    self.proj_q = _dense(ch, ch, rngs, dtype)
    self.proj_k = _dense(ch, ch, rngs, dtype)
    self.proj_v = _dense(ch, ch, rngs, dtype)
    self.proj = _dense(ch, ch, rngs, dtype, scale=1e-10)

  def __call__(self, x):  # x: [B, H, W, C]
    b, h, w, c = x.shape
    y = self.norm(x).reshape(b, h * w, c)
    q, k, v = self.proj_q(y), self.proj_k(y), self.proj_v(y)  # [B, HW, C]
    if self.num_heads == 1:  # the single-head program of every pixel target, unchanged
      logits = jnp.einsum('bqc,bkc->bqk', q, k) * (c**-0.5)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      attended = jnp.einsum('bqk,bkc->bqc', weights, v)
    else:
      attended = multihead_attention(q, k, v, self.num_heads)
    return x + self.proj(attended).reshape(b, h, w, c)


class ResBlock(nnx.Module):
  """GroupNorm-SiLU-conv, + time projection, GroupNorm-SiLU-dropout-conv, shortcut, [attention]."""

  def __init__(
    self, cin: int, cout: int, tdim: int, attn: bool, cfg: UNetConfig, dtype, rngs: nnx.Rngs
  ):
    self.norm1 = nnx.GroupNorm(
      cin, num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs
    )
    self.conv1 = _conv(cin, cout, 3, rngs, dtype)
    self.temb_proj = _dense(tdim, cout, rngs, dtype)
    self.norm2 = nnx.GroupNorm(
      cout, num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs
    )
    self.dropout = nnx.Dropout(cfg.dropout)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype, scale=1e-10)
    self.shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None
    self.attn = AttnBlock(cout, cfg, dtype, rngs) if attn else None

  def __call__(self, x, temb, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
    h = nnx.silu(self.norm2(h))
    h = self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.conv2(h)
    h = h + (self.shortcut(x) if self.shortcut is not None else x)
    return self.attn(h) if self.attn is not None else h


class DownSample(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, dtype, rngs: nnx.Rngs):
    pad = ((1, 1), (1, 1)) if cfg.downsample_padding == 'symmetric' else ((0, 1), (0, 1))
    self.main = _conv(ch, ch, 3, rngs, dtype, stride=2, padding=pad)

  def __call__(self, x, temb, *, deterministic, rngs):
    del temb, deterministic, rngs
    return self.main(x)


class UpSample(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, dtype, rngs: nnx.Rngs):
    del cfg
    self.main = _conv(ch, ch, 3, rngs, dtype)

  def __call__(self, x, temb, *, deterministic, rngs):
    del temb, deterministic, rngs
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.main(x)


class TimeEmbedding(nnx.Module):
  def __init__(self, ch: int, tdim: int, cfg: UNetConfig, dtype, rngs: nnx.Rngs):
    self.ch, self.layout, self.shift = ch, cfg.time_embed_layout, cfg.time_freq_shift
    self.dense0 = _dense(ch, tdim, rngs, dtype)
    self.dense1 = _dense(tdim, tdim, rngs, dtype)

  def __call__(self, t):
    emb = timestep_embedding(t, self.ch, self.layout, self.shift)
    return self.dense1(nnx.silu(self.dense0(emb)))


class UNet(nnx.Module):
  """The DDPM UNet; ``__call__(x [B,H,W,C], t [B]) -> eps [B,H,W,C]``."""

  def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    ch, tdim = cfg.ch, 4 * cfg.ch
    self.time_embedding = TimeEmbedding(ch, tdim, cfg, dtype, rngs)
    self.head = _conv(cfg.in_channels, ch, 3, rngs, dtype)
    down, chs, now, res = [], [ch], ch, cfg.resolution
    for i, mult in enumerate(cfg.ch_mult):
      out = ch * mult
      for _ in range(cfg.num_res_blocks):
        down.append(ResBlock(now, out, tdim, res in cfg.attn_res, cfg, dtype, rngs))
        now = out
        chs.append(now)
      if i != len(cfg.ch_mult) - 1:
        down.append(DownSample(now, cfg, dtype, rngs))
        chs.append(now)
        res //= 2
    self.downblocks = nnx.List(down)
    self.middleblocks = nnx.List(
      [
        ResBlock(now, now, tdim, True, cfg, dtype, rngs),
        ResBlock(now, now, tdim, False, cfg, dtype, rngs),
      ]
    )
    up = []
    for i, mult in reversed(list(enumerate(cfg.ch_mult))):
      out = ch * mult
      for _ in range(cfg.num_res_blocks + 1):
        up.append(ResBlock(chs.pop() + now, out, tdim, res in cfg.attn_res, cfg, dtype, rngs))
        now = out
      if i != 0:
        up.append(UpSample(now, cfg, dtype, rngs))
        res *= 2
    assert not chs
    self.upblocks = nnx.List(up)
    self.tail_norm = nnx.GroupNorm(
      now, num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs
    )
    self.tail_conv = _conv(now, cfg.out_channels, 3, rngs, dtype, scale=1e-10)

  def __call__(self, x, t, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    kw = dict(deterministic=deterministic, rngs=rngs)
    in_dtype = x.dtype
    x = x.astype(jnp.dtype(self.cfg.dtype))
    temb = self.time_embedding(jnp.broadcast_to(t, (x.shape[0],)))
    h = self.head(x)
    hs = [h]
    for layer in self.downblocks:
      h = layer(h, temb, **kw)
      hs.append(h)
    for layer in self.middleblocks:
      h = layer(h, temb, **kw)
    for layer in self.upblocks:
      if isinstance(layer, ResBlock):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
      h = layer(h, temb, **kw)
    h = self.tail_conv(nnx.silu(self.tail_norm(h)))
    return h.astype(in_dtype)


Params = Any  # nested dict of arrays (nnx pure dict)


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
  """A UNet as (config, graphdef): pure apply functions over a params pytree.

  ``apply(params, x, t)`` is the deterministic epsilon prediction used by every attack;
  ``apply_train(params, x, t, key)`` applies dropout.
  """

  config: UNetConfig
  graphdef: Any

  @classmethod
  def create(cls, config: UNetConfig, seed: int = 0) -> tuple[DiffusionModel, Params]:
    """Builds the model and initial params (a nested dict of float32 arrays)."""
    graphdef, state = nnx.split(UNet(config, nnx.Rngs(params=seed, dropout=seed)))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  @classmethod
  def abstract(cls, config: UNetConfig) -> tuple[DiffusionModel, Params]:
    """Model and a params pytree of ShapeDtypeStructs (no allocation)."""
    unet = nnx.eval_shape(lambda: UNet(config, nnx.Rngs(params=0, dropout=0)))
    graphdef, state = nnx.split(unet)
    return cls(config, graphdef), nnx.to_pure_dict(state)

  def _merge(self, params):
    return nnx.merge(self.graphdef, params)

  def apply(self, params: Params, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    return self._merge(params)(x, t)

  def apply_train(self, params: Params, x: jnp.ndarray, t: jnp.ndarray, key) -> jnp.ndarray:
    return self._merge(params)(x, t, deterministic=False, rngs=nnx.Rngs(dropout=key))


def count_params(params: Params) -> int:
  return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def flat_params(params: Params) -> dict[str, Any]:
  """{'downblocks.0.conv1.kernel': leaf, ...}: dotted names, the form checkpoint importers map."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out['.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)] = leaf
  return out


def flat_param_shapes(params: Params) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in flat_params(params).items()}


def unflatten_params(like: Params, flat: dict[str, Any]) -> Params:
  """The inverse of ``flat_params``: a tree shaped like ``like`` with leaves taken by name."""
  names = list(flat_params(like))
  missing = [n for n in names if n not in flat]
  if missing:
    raise KeyError(f'missing parameters {missing[:5]}')
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def unet_config_from(cfg_model, resolution: int, channels: int) -> UNetConfig:
  """UNetConfig from a config's ``model`` section plus the data resolution and channels."""
  d = dict(cfg_model)
  return UNetConfig.from_dict(
    dict(d, resolution=resolution, in_channels=channels, out_channels=channels)
  )


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: UNetConfig) -> tuple[DiffusionModel, Any]:
  """``DiffusionModel.abstract(cfg)``, cached per config (tracing the UNet's init takes seconds).

  The returned params tree of ShapeDtypeStructs is shared between callers: do not mutate it.
  """
  return DiffusionModel.abstract(cfg)
