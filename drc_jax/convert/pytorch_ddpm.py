"""``pytorch-ddpm`` (github.com/w86763777/pytorch-ddpm, the targets of SecMI and PIA): a ``.pt``
dict with ``net_model`` and ``ema_model`` state dicts (EMA by default), or a bare state dict. The
architecture (ch, ch_mult, num_res_blocks, attention levels, channels, T) is read from the state
dict's keys and shapes; only the image resolution is not stored (default 32).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from drc_jax.convert.common import (
  ConversionError,
  Converted,
  Source,
  assemble,
  diffusion_settings,
  leaf_source,
  param_names,
  read_checkpoint,
  split_name,
  state_dict,
)
from drc_jax.models import unet as model_lib

_DDPM_NORM_GROUPS = 32  # pytorch-ddpm hard-codes nn.GroupNorm(32, C) with the default eps
_DDPM_NORM_EPS = 1e-5
_DDPM_TIME_TABLE = 'time_embedding.timembedding.0.weight'

_DDPM_RESBLOCK = {
  'norm1': 'block1.0',
  'conv1': 'block1.2',
  'temb_proj': 'temb_proj.1',
  'norm2': 'block2.0',
  'conv2': 'block2.3',
  'shortcut': 'shortcut',
  'attn.norm': 'attn.group_norm',
  'attn.proj_q': 'attn.proj_q',
  'attn.proj_k': 'attn.proj_k',
  'attn.proj_v': 'attn.proj_v',
  'attn.proj': 'attn.proj',
  'main': 'main',
}
_DDPM_TOP = {
  'time_embedding.dense0': 'time_embedding.timembedding.1',
  'time_embedding.dense1': 'time_embedding.timembedding.3',
  'head': 'head',
  'tail_norm': 'tail.0',
  'tail_conv': 'tail.2',
}


def select_pytorch_ddpm_weights(obj, weights: str, where: str) -> dict[str, np.ndarray]:
  """The state dict to convert: ``ema_model``/``net_model`` of a training checkpoint, or a bare one.

  Args:
    obj: what ``read_checkpoint`` returned.
    weights: 'ema' or 'net' (used only when ``obj`` holds both).
    where: file name for messages.

  Returns:
    {key: float32 numpy array}.
  """
  if weights not in ('ema', 'net'):
    raise ConversionError(f"weights must be 'ema' or 'net', got {weights!r}")
  if isinstance(obj, Mapping) and ('ema_model' in obj or 'net_model' in obj):
    key = f'{weights}_model'
    if key not in obj:
      raise ConversionError(
        f'{where}: no {key!r} state dict in the checkpoint (found keys '
        f'{sorted(map(str, obj))}); choose --weights accordingly'
      )
    return state_dict(obj[key], f'{where}[{key!r}]')
  logging.info('%s: a bare state dict (no net_model/ema_model): converting it as is', where)
  return state_dict(obj, where)


def _block_indices(state, prefix: str, where: str) -> list[int]:
  idx = sorted({int(m.group(1)) for k in state if (m := re.match(rf'{prefix}\.(\d+)\.', k))})
  if idx != list(range(len(idx))):
    raise ConversionError(f'{where}: {prefix} indices {idx} are not 0..{len(idx) - 1}')
  return idx


def _require(state, key: str, where: str) -> np.ndarray:
  if key not in state:
    raise ConversionError(f'{where}: missing key {key} (cannot infer the architecture)')
  return state[key]


def pytorch_ddpm_config(
  state: dict[str, np.ndarray], resolution: int = 32, where: str = 'state dict'
) -> model_lib.UNetConfig:
  """Infers the UNet of a pytorch-ddpm state dict from its keys and shapes.

  Args:
    state: the state dict.
    resolution: image side; not stored in the checkpoint, it places the attention levels.
    where: file name for messages.

  Returns:
    The UNetConfig (interleaved sin/cos time embedding, no frequency shift, symmetric
    downsampling padding, GroupNorm(32, eps 1e-5)).
  """
  head = _require(state, 'head.weight', where)
  tail = _require(state, 'tail.2.weight', where)
  if head.ndim != 4 or tail.ndim != 4:
    raise ConversionError(f'{where}: head.weight / tail.2.weight are not conv kernels')
  ch, in_channels, out_channels = head.shape[0], head.shape[1], tail.shape[0]
  levels, current = [], []  # per level: [(out_channels, has_attention)] of its ResBlocks
  for n in _block_indices(state, 'downblocks', where):
    p = f'downblocks.{n}'
    if f'{p}.main.weight' in state:
      levels.append(current)
      current = []
    elif f'{p}.block1.2.weight' in state:
      current.append(
        (state[f'{p}.block1.2.weight'].shape[0], any(k.startswith(f'{p}.attn.') for k in state))
      )
    else:
      raise ConversionError(
        f'{where}: cannot tell what {p} is (neither {p}.main.weight of a '
        f'DownSample nor {p}.block1.2.weight of a ResBlock)'
      )
  levels.append(current)
  num_res_blocks = len(levels[0])
  ch_mult, attn_levels = [], []
  for i, level in enumerate(levels):
    if len(level) != num_res_blocks or not level:
      raise ConversionError(
        f'{where}: level {i} of downblocks has {len(level)} ResBlocks, level 0 '
        f'has {num_res_blocks}: unsupported layout'
      )
    out = {c for c, _ in level}
    attn = {a for _, a in level}
    if len(out) != 1 or out.pop() % ch or len(attn) != 1:
      raise ConversionError(
        f'{where}: the ResBlocks of level {i} of downblocks differ in width or '
        f'attention, or their width is not a multiple of ch={ch}'
      )
    ch_mult.append(level[0][0] // ch)
    if attn.pop():
      attn_levels.append(i)
  try:
    return model_lib.UNetConfig(
      resolution=resolution,
      in_channels=in_channels,
      out_channels=out_channels,
      ch=ch,
      ch_mult=tuple(ch_mult),
      num_res_blocks=num_res_blocks,
      attn_res=tuple(resolution // 2**i for i in attn_levels),
      dropout=0.1,
      norm_groups=_DDPM_NORM_GROUPS,
      norm_eps=_DDPM_NORM_EPS,
      time_embed_layout='interleaved',
      time_freq_shift=0,
      downsample_padding='symmetric',
    )
  except ValueError as e:
    raise ConversionError(f'{where}: inferred an unsupported architecture ({e})') from e


def _pytorch_ddpm_sources(cfg: model_lib.UNetConfig) -> dict[str, Source]:
  out = {}
  for name in param_names(cfg):
    module, leaf = split_name(name)
    if module in _DDPM_TOP:
      src, kind = _DDPM_TOP[module], 'conv' if module in ('head', 'tail_conv') else 'linear'
    else:
      block, inner = re.fullmatch(r'((?:down|middle|up)blocks\.\d+)\.(.+)', module).groups()
      src = f'{block}.{_DDPM_RESBLOCK[inner]}'
      kind = (
        'conv1x1' if inner.startswith('attn.') else 'linear' if inner == 'temb_proj' else 'conv'
      )
    out[name] = leaf_source(src, leaf, kind)
  return out


def _check_time_table(table: np.ndarray, ch: int, where: str) -> None:
  """The fixed sinusoid table must be the interleaved embedding our UNet computes."""
  t = np.arange(table.shape[0], dtype=np.float64)[:, None]
  half = ch // 2
  args = t * np.exp(-math.log(10000.0) * np.arange(half) / half)[None, :]
  want = np.stack([np.sin(args), np.cos(args)], axis=-1).reshape(table.shape[0], ch)
  err = float(np.max(np.abs(table.astype(np.float64) - want)))
  if err > 1e-3:
    raise ConversionError(
      f'{where}: {_DDPM_TIME_TABLE} is not the interleaved sinusoidal '
      f'embedding of pytorch-ddpm (max deviation {err:.3g})'
    )


def convert_pytorch_ddpm(
  src, weights: str = 'ema', resolution: int | None = None, diffusion: dict[str, Any] | None = None
) -> Converted:
  """Reads a pytorch-ddpm checkpoint into drc_jax params.

  Args:
    src: ``.pt``/``.pth`` (torch.save of the training dict or of a state dict) or
      ``.safetensors`` state dict.
    weights: 'ema' (default) or 'net' when the file holds both.
    resolution: image side (default 32).
    diffusion: explicit schedule settings (num_timesteps, beta_start, beta_end); T defaults to
      the rows of the embedding table, the betas to DDPM's 1e-4..0.02 linear.

  Returns:
    The converted target.
  """
  where = str(src)
  obj = read_checkpoint(src)
  state = select_pytorch_ddpm_weights(obj, weights, where)
  cfg = pytorch_ddpm_config(state, 32 if resolution is None else resolution, where)
  params = assemble(cfg, _pytorch_ddpm_sources(cfg), state, where, also_used=(_DDPM_TIME_TABLE,))
  table = state[_DDPM_TIME_TABLE]
  if table.shape[1:] != (cfg.ch,):
    raise ConversionError(
      f'{where}: {_DDPM_TIME_TABLE} has shape {table.shape}, expected (T, {cfg.ch})'
    )
  _check_time_table(table, cfg.ch, where)
  diff = diffusion_settings(
    {'num_timesteps': int(table.shape[0])}, diffusion, f'{_DDPM_TIME_TABLE} ({table.shape[0]} rows)'
  )
  step = obj.get('step', 0) if isinstance(obj, Mapping) and 'ema_model' in obj else 0
  kind = f'{weights}_model' if isinstance(obj, Mapping) and 'ema_model' in obj else 'state dict'
  return Converted(
    cfg,
    params,
    diff,
    f'pytorch-ddpm:{src} ({kind})',
    step if isinstance(step, int) and step >= 0 else 0,
  )
