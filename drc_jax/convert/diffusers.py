"""``diffusers``: a ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model``
``.safetensors`` or ``.bin``) in the google/ddpm-cifar10-32 layout or the CompVis LDM layout
(multi-head attention, ``attention_head_dim``). The architecture comes from ``config.json``;
settings our UNet does not compute are refused, naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

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
from drc_jax.core import records
from drc_jax.models import unet as model_lib

_DIFFUSERS_DEFAULTS = {
  'sample_size': None,
  'in_channels': 3,
  'out_channels': 3,
  'center_input_sample': False,
  'time_embedding_type': 'positional',
  'time_embedding_dim': None,
  'freq_shift': 0,
  'flip_sin_to_cos': True,
  'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
  'mid_block_type': 'UNetMidBlock2D',
  'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
  'block_out_channels': (224, 448, 672, 896),
  'layers_per_block': 2,
  'mid_block_scale_factor': 1,
  'downsample_padding': 1,
  'downsample_type': 'conv',
  'upsample_type': 'conv',
  'dropout': 0.0,
  'act_fn': 'silu',
  'attention_head_dim': 8,
  'norm_num_groups': 32,
  'attn_norm_num_groups': None,
  'norm_eps': 1e-5,
  'resnet_time_scale_shift': 'default',
  'add_attention': True,
  'class_embed_type': None,
  'num_class_embeds': None,
  'num_train_timesteps': None,
}
# Fields whose value must be exactly this (anything else computes something our UNet does not).
_DIFFUSERS_REQUIRED = {
  'center_input_sample': False,
  'time_embedding_type': 'positional',
  'mid_block_type': 'UNetMidBlock2D',
  'mid_block_scale_factor': 1,
  'downsample_type': 'conv',
  'upsample_type': 'conv',
  'resnet_time_scale_shift': 'default',
  'add_attention': True,
  'class_embed_type': None,
  'num_class_embeds': None,
}
_DOWN_TYPES = {'DownBlock2D': False, 'AttnDownBlock2D': True}
_UP_TYPES = {'UpBlock2D': False, 'AttnUpBlock2D': True}
_DIFFUSERS_RESNET = {
  'norm1': 'norm1',
  'conv1': 'conv1',
  'temb_proj': 'time_emb_proj',
  'norm2': 'norm2',
  'conv2': 'conv2',
  'shortcut': 'conv_shortcut',
}
_DIFFUSERS_ATTN = {
  'norm': 'group_norm',
  'proj_q': 'to_q',
  'proj_k': 'to_k',
  'proj_v': 'to_v',
  'proj': 'to_out.0',
}
_DIFFUSERS_TOP = {
  'time_embedding.dense0': 'time_embedding.linear_1',
  'time_embedding.dense1': 'time_embedding.linear_2',
  'head': 'conv_in',
  'tail_norm': 'conv_norm_out',
  'tail_conv': 'conv_out',
}
# Attention weights of diffusers < 0.14 (and of the google/ddpm-* hub files) -> current names.
_DEPRECATED_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def diffusers_config(
  config: Mapping[str, Any], resolution: int | None = None, where: str = 'config.json'
) -> model_lib.UNetConfig:
  """The UNetConfig of a diffusers ``UNet2DModel`` config, refusing what our UNet cannot compute.

  Args:
    config: the parsed ``config.json``.
    resolution: overrides ``sample_size`` (required when the config has none).
    where: file name for messages.

  Returns:
    The UNetConfig.
  """
  c = records.diffusers_config(config, 'UNet2DModel', _DIFFUSERS_DEFAULTS, where, ConversionError)

  def refuse(field, why):
    raise ConversionError(f'{where}: unsupported {field}={c[field]!r} ({why})')

  for field, value in _DIFFUSERS_REQUIRED.items():
    if c[field] != value:
      refuse(field, f'only {value!r} is supported')
  if c['act_fn'] not in ('silu', 'swish'):
    refuse('act_fn', "only 'silu' is supported")
  boc = [int(b) for b in c['block_out_channels']]
  ch = boc[0]
  if any(b % ch for b in boc):
    refuse('block_out_channels', 'every width must be a multiple of the first')
  down, up = list(c['down_block_types']), list(c['up_block_types'])
  if len(down) != len(boc) or any(t not in _DOWN_TYPES for t in down):
    refuse('down_block_types', f'expected {len(boc)} of {sorted(_DOWN_TYPES)}')
  if len(up) != len(boc) or any(t not in _UP_TYPES for t in up):
    refuse('up_block_types', f'expected {len(boc)} of {sorted(_UP_TYPES)}')
  attn_levels = [i for i, t in enumerate(down) if _DOWN_TYPES[t]]
  if [_UP_TYPES[t] for t in reversed(up)] != [_DOWN_TYPES[t] for t in down]:
    refuse('up_block_types', 'attention must be at the same resolutions as in down_block_types')
  # diffusers splits an attention block of width C into C // attention_head_dim heads (None: one
  # head); the head width must divide every attention width (the attention levels and the middle).
  head_dim = c['attention_head_dim']
  widths = sorted({boc[i] for i in attn_levels} | {boc[-1]})
  if head_dim is not None and (type(head_dim) is not int or head_dim < 1):
    refuse('attention_head_dim', 'only None or a positive integer')
  if head_dim is not None and any(w % head_dim for w in widths):
    refuse('attention_head_dim', f'it must divide every attention width {widths}')
  if head_dim is not None and all(w == head_dim for w in widths):
    head_dim = None  # one head everywhere: the single-head model of pixel targets
  if c['time_embedding_dim'] not in (None, 4 * ch):
    refuse('time_embedding_dim', f'only None or 4 * block_out_channels[0] = {4 * ch}')
  if c['norm_num_groups'] is None:
    refuse('norm_num_groups', 'an explicit group count is required')
  if c['attn_norm_num_groups'] not in (None, c['norm_num_groups']):
    refuse('attn_norm_num_groups', 'only None or norm_num_groups')
  if c['downsample_padding'] not in (0, 1):
    refuse('downsample_padding', 'only 0 (pad right/bottom) or 1')
  if int(c['freq_shift']) != c['freq_shift']:
    refuse('freq_shift', 'only integers')
  if resolution is None:
    size = c['sample_size']
    if isinstance(size, (list, tuple)):
      if len(size) != 2 or size[0] != size[1]:
        refuse('sample_size', 'only square images')
      size = size[0]
    if size is None:
      raise ConversionError(f'{where}: no sample_size; pass --resolution')
    resolution = int(size)
  try:
    return model_lib.UNetConfig(
      resolution=resolution,
      in_channels=int(c['in_channels']),
      out_channels=int(c['out_channels']),
      ch=ch,
      ch_mult=tuple(b // ch for b in boc),
      num_res_blocks=int(c['layers_per_block']),
      attn_res=tuple(resolution // 2**i for i in attn_levels),
      dropout=float(c['dropout']),
      norm_groups=int(c['norm_num_groups']),
      norm_eps=float(c['norm_eps']),
      time_embed_layout='cos_sin' if c['flip_sin_to_cos'] else 'sin_cos',
      time_freq_shift=int(c['freq_shift']),
      downsample_padding='asymmetric' if c['downsample_padding'] == 0 else 'symmetric',
      attn_head_dim=None if head_dim is None else int(head_dim),
    )
  except ValueError as e:
    raise ConversionError(f'{where}: unsupported architecture ({e})') from e


# diffusers beta_schedule -> ours (drc_jax.core.schedule); 'squaredcos_cap_v2' is diffusers'
# betas_for_alpha_bar: schedule.cosine_betas' formula and 0.999 cap (checked in test_schedule).
SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear', 'squaredcos_cap_v2': 'cosine'}


def _diffusers_block_prefixes(cfg: model_lib.UNetConfig) -> dict[str, tuple[str, str]]:
  """Our block (``downblocks.N``...) -> (its diffusers resnet/sampler module, attention module)."""
  out, n, levels = {}, 0, len(cfg.ch_mult)
  for i in range(levels):
    for j in range(cfg.num_res_blocks):
      out[f'downblocks.{n}'] = (f'down_blocks.{i}.resnets.{j}', f'down_blocks.{i}.attentions.{j}')
      n += 1
    if i != levels - 1:
      out[f'downblocks.{n}'] = (f'down_blocks.{i}.downsamplers.0.conv', '')
      n += 1
  out['middleblocks.0'] = ('mid_block.resnets.0', 'mid_block.attentions.0')
  out['middleblocks.1'] = ('mid_block.resnets.1', '')
  n = 0
  for i in range(levels):
    for j in range(cfg.num_res_blocks + 1):
      out[f'upblocks.{n}'] = (f'up_blocks.{i}.resnets.{j}', f'up_blocks.{i}.attentions.{j}')
      n += 1
    if i != levels - 1:
      out[f'upblocks.{n}'] = (f'up_blocks.{i}.upsamplers.0.conv', '')
      n += 1
  return out


def diffusers_sources(cfg: model_lib.UNetConfig) -> dict[str, Source]:
  blocks = _diffusers_block_prefixes(cfg)
  out = {}
  for name in param_names(cfg):
    module, leaf = split_name(name)
    if module in _DIFFUSERS_TOP:
      src = _DIFFUSERS_TOP[module]
      kind = 'conv' if module in ('head', 'tail_conv') else 'linear'
    else:
      block, inner = re.fullmatch(r'((?:down|middle|up)blocks\.\d+)\.(.+)', module).groups()
      resnet, attn = blocks[block]
      if inner == 'main':
        src, kind = resnet, 'conv'
      elif inner.startswith('attn.'):
        src, kind = f'{attn}.{_DIFFUSERS_ATTN[inner[len("attn.") :]]}', 'linear'
      else:
        src = f'{resnet}.{_DIFFUSERS_RESNET[inner]}'
        kind = 'linear' if inner == 'temb_proj' else 'conv'
    out[name] = leaf_source(src, leaf, kind)
  return out


def rename_deprecated_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state.items():
    m = re.fullmatch(r'(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)', k)
    new = f'{m.group(1)}.{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}' if m else k
    out[new if new not in state else k] = v
  return out


def _diffusers_files(src) -> tuple[epath.Path, epath.Path]:
  """(config.json, weights file) of a UNet2DModel folder, a pipeline folder or a weights file."""
  src = epath.Path(src)
  if not src.exists():
    raise ConversionError(f'{src}: not found')
  if not src.is_dir():
    return src.parent / 'config.json', src
  if not (src / 'config.json').exists() and (src / 'unet' / 'config.json').exists():
    src = src / 'unet'  # a pipeline folder (model_index.json, unet/, scheduler/)
  for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'):
    if (src / name).exists():
      return src / 'config.json', src / name
  raise ConversionError(
    f'{src}: no diffusion_pytorch_model.safetensors or .bin (sharded checkpoints are not supported)'
  )


def scheduler_settings(weights: epath.Path) -> tuple[dict[str, Any], str]:
  """Schedule recorded by a diffusers scheduler config next to the UNet, if there is one.

  Its ``beta_schedule`` is recorded under our name (``SCHEDULES``); the others, learned or
  rescaled betas and other predictions than epsilon are refused, naming the field.
  """
  folder = weights.parent
  for path in (
    folder / 'scheduler_config.json',
    folder.parent / 'scheduler' / 'scheduler_config.json',
  ):
    if path.exists():
      break
  else:
    return {}, ''
  s = records.read_json(path, ConversionError)
  if s.get('prediction_type', 'epsilon') != 'epsilon':
    raise ConversionError(
      f'{path}: prediction_type={s["prediction_type"]!r}; only epsilon prediction is supported'
    )
  kind = s.get('beta_schedule', 'linear')
  if s.get('trained_betas') is not None or kind not in SCHEDULES:
    raise ConversionError(
      f'{path}: only beta_schedule {" or ".join(map(repr, SCHEDULES))} is supported (found '
      f'beta_schedule={kind!r}, trained_betas={"set" if s.get("trained_betas") else None})'
    )
  if s.get('rescale_betas_zero_snr'):
    raise ConversionError(f'{path}: rescale_betas_zero_snr=true is not supported')
  found = {'beta_schedule': SCHEDULES[kind]}
  for ours, theirs in (
    ('num_timesteps', 'num_train_timesteps'),
    ('beta_start', 'beta_start'),
    ('beta_end', 'beta_end'),
  ):
    if theirs in s:
      found[ours] = s[theirs]
  return found, str(path)


def convert_diffusers(
  src, resolution: int | None = None, diffusion: dict[str, Any] | None = None
) -> Converted:
  """Reads a diffusers ``UNet2DModel`` (DDPM layout) into drc_jax params.

  Args:
    src: the model folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``),
      a pipeline folder with ``unet/``, or the weights file itself.
    resolution: overrides ``sample_size``.
    diffusion: explicit schedule settings; by default a ``scheduler_config.json`` beside the
      model (or in ``../scheduler``), else DDPM's T=1000 linear 1e-4..0.02.

  Returns:
    The converted target.
  """
  config_path, weights_path = _diffusers_files(src)
  if not config_path.exists():
    raise ConversionError(f'{config_path}: not found (a diffusers model needs its config.json)')
  config = records.read_json(config_path, ConversionError)
  cfg = diffusers_config(config, resolution, str(config_path))
  where = str(weights_path)
  state = rename_deprecated_attention(state_dict(read_checkpoint(weights_path), where))
  params = assemble(cfg, diffusers_sources(cfg), state, where)
  found, sched_path = scheduler_settings(weights_path)
  return Converted(
    cfg, params, diffusion_settings(found, diffusion, sched_path), f'diffusers:{src}'
  )
