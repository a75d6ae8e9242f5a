"""Imports PyTorch DDPM checkpoints as drc_jax targets (orbax checkpoint + ``model.json``).

Two public layouts of the DDPM CIFAR10 UNet are read:

* ``pytorch-ddpm`` (github.com/w86763777/pytorch-ddpm, the targets of SecMI and PIA): a ``.pt``
  dict with ``net_model`` and ``ema_model`` state dicts (EMA by default), or a bare state dict.
  The architecture (ch, ch_mult, num_res_blocks, attention levels, channels, T) is read from the
  state dict's keys and shapes; only the image resolution is not stored (default 32).
* ``diffusers``: a ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model``
  ``.safetensors`` or ``.bin``) in the google/ddpm-cifar10-32 layout. The architecture comes from
  ``config.json``; settings our UNet does not compute are refused, naming the field.

  python -m drc_jax.convert --format=pytorch-ddpm --src=ckpt.pt --workdir=runs/secmi_cifar10
  python -m drc_jax.convert --format=diffusers --src=ddpm-cifar10-32 --workdir=runs/google_ddpm

Every parameter of the model must come from exactly one source tensor of the expected shape, and
every source tensor must be used: a missing, unexpected, misshapen or non-finite tensor is a
``ConversionError`` naming the key, raised before anything is written. Safetensors files are read
without torch; pickled files (``.pt``/``.pth``/``.bin``) only with ``torch.load(...,
weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath

from drc_jax import checkpoints, errors
from drc_jax import model as model_lib
from drc_jax import target as target_lib

FORMATS = ('pytorch-ddpm', 'diffusers')
DEFAULT_DIFFUSION = {
  'num_timesteps': 1000,
  'beta_schedule': 'linear',
  'beta_start': 1e-4,
  'beta_end': 0.02,
}
_PICKLE_SUFFIXES = ('.pt', '.pth', '.bin')
_SAFETENSORS_SUFFIX = '.safetensors'
_DDPM_NORM_GROUPS = 32  # pytorch-ddpm hard-codes nn.GroupNorm(32, C) with the default eps
_DDPM_NORM_EPS = 1e-5
_DDPM_TIME_TABLE = 'time_embedding.timembedding.0.weight'


class ConversionError(errors.UserError, ValueError):
  """A checkpoint that cannot be imported; the message names the file, key or config field."""


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted target, ready for ``write_target``.

  Attributes:
    config: architecture of the UNet.
    params: nested dict of float32 numpy arrays in the layout of ``DiffusionModel.create``.
    diffusion: noise schedule description for ``model.json`` (num_timesteps, beta_schedule, ...).
    source: where the weights came from (written to ``model.json``).
    step: training step of the source checkpoint when it records one, else 0.
  """

  config: model_lib.UNetConfig
  params: Any
  diffusion: dict[str, Any]
  source: str
  step: int = 0


# ----------------------------------------------------------------------------- reading files


def _import_torch(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
      f'{path}: reading a pickled PyTorch file needs torch; install the '
      f"'torch' extra (pip install -e '.[torch]'), or convert the weights to "
      f'.safetensors'
    ) from e
  return torch


def read_checkpoint(path) -> Any:
  """Loads a checkpoint file without running code from it.

  Args:
    path: a ``.safetensors`` file (read with ``safetensors.numpy``, no torch) or a pickled
      PyTorch file ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)`` on CPU).

  Returns:
    The loaded object: a dict of numpy arrays for safetensors; for pickles whatever was saved
    (a state dict of tensors, or a dict holding state dicts).

  Raises:
    ConversionError: missing file, unsupported extension, missing torch, or a pickle that
      ``weights_only`` loading refuses.
  """
  path = epath.Path(path)
  if not path.exists():
    raise ConversionError(f'{path}: checkpoint file not found')
  name = path.name.lower()
  if name.endswith(_SAFETENSORS_SUFFIX):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top

    try:
      return safetensors.numpy.load(path.read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError on corrupt headers
      raise ConversionError(f'{path}: unreadable safetensors file ({e})') from e
  if name.endswith(_PICKLE_SUFFIXES):
    torch = _import_torch(path)
    local = not re.match(r'^[a-z][a-z0-9+.-]*://', os.fspath(path))
    try:
      return torch.load(
        os.fspath(path) if local else io.BytesIO(path.read_bytes()),
        map_location='cpu',
        weights_only=True,
      )
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... on refused pickles
      raise ConversionError(
        f'{path}: cannot load with torch.load(weights_only=True): the file is '
        f'corrupt or holds objects other than tensors and containers '
        f'({str(e)[:300]})'
      ) from e
  raise ConversionError(
    f'{path}: unsupported checkpoint extension (expected '
    f'{_SAFETENSORS_SUFFIX} or one of {_PICKLE_SUFFIXES}; other pickles are '
    f'refused because loading them can run code)'
  )


def _is_array(v) -> bool:
  return isinstance(v, np.ndarray) or (hasattr(v, 'detach') and hasattr(v, 'shape'))


def _to_numpy(v) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
  v = v.detach().cpu()
  return v.float().numpy() if v.is_floating_point() else v.numpy()


def _state_dict(obj, where: str) -> dict[str, np.ndarray]:
  """{key: numpy array} of a mapping of tensors (floats as float32, ``module.`` prefix dropped)."""
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f'{where}: expected a non-empty state dict, found {type(obj).__name__}')
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not _is_array(v)]
  if bad:
    raise ConversionError(
      f'{where}: not a state dict of tensors (entry {bad[0]!r} is not a '
      f'tensor; top-level keys {sorted(map(str, obj))[:8]})'
    )
  state = {k: _to_numpy(v) for k, v in obj.items()}
  if all(k.startswith('module.') for k in state):  # saved from torch.nn.DataParallel
    state = {k[len('module.') :]: v for k, v in state.items()}
  return state


# ----------------------------------------------------------------------------- assembling params


@dataclasses.dataclass(frozen=True)
class _Source:
  """One source tensor for one parameter: its key and how its layout differs from ours."""

  key: str
  # 'conv': OIHW -> HWIO; 'linear': [out, in] -> [in, out]; 'conv1x1': [out, in, 1, 1] -> [in, out];
  # 'vector': as is.
  kind: str


def _source_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The source tensor shape that converts to our parameter ``shape``."""
  if kind == 'conv':
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if kind == 'linear':
    return (shape[1], shape[0])
  if kind == 'conv1x1':
    return (shape[1], shape[0], 1, 1)
  return shape


def _convert_tensor(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    x = x.transpose(2, 3, 1, 0)
  elif kind == 'linear':
    x = x.T
  elif kind == 'conv1x1':
    x = x[:, :, 0, 0].T
  return np.ascontiguousarray(x, dtype=np.float32)


def _leaf_source(module: str, leaf: str, kernel_kind: str) -> _Source:
  """Our ``module.leaf`` (leaf: kernel, scale or bias) as a PyTorch ``module.weight|bias``."""
  if leaf == 'kernel':
    return _Source(f'{module}.weight', kernel_kind)
  return _Source(f'{module}.{"weight" if leaf == "scale" else "bias"}', 'vector')


def _describe(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def _assemble(
  cfg: model_lib.UNetConfig,
  sources: dict[str, _Source],
  state: dict[str, np.ndarray],
  where: str,
  also_used: tuple[str, ...] = (),
) -> Any:
  """Builds the params tree of ``cfg`` from ``state``; every problem is an error naming keys.

  Args:
    cfg: the architecture; its abstract params give the expected names and shapes.
    sources: our dotted parameter name -> source tensor.
    state: the source state dict.
    where: file name for messages.
    also_used: source keys that are consumed elsewhere (checked, not converted).

  Returns:
    Nested dict of float32 numpy arrays with the structure of ``DiffusionModel.create(cfg)[1]``.
  """
  _, abstract = target_lib.abstract_model(cfg)
  expected = model_lib.flat_param_shapes(abstract)
  assert set(expected) == set(sources), sorted(set(expected) ^ set(sources))
  wanted = {s.key for s in sources.values()} | set(also_used)
  missing = wanted - set(state)
  unexpected = set(state) - wanted
  problems = []
  if missing:
    problems.append(f'missing keys {_describe(missing)}')
  if unexpected:
    problems.append(f'unexpected keys {_describe(unexpected)}')
  misshapen = [
    f'{s.key}: checkpoint {tuple(state[s.key].shape)} vs expected '
    f'{_source_shape(s.kind, expected[name])}'
    for name, s in sources.items()
    if s.key in state and tuple(state[s.key].shape) != _source_shape(s.kind, expected[name])
  ]
  if misshapen:
    problems.append('shape mismatch ' + '; '.join(misshapen[:6]))
  if problems:
    raise ConversionError(
      f'{where}: the state dict does not match the inferred architecture '
      f'{_arch(cfg)}: ' + '; '.join(problems)
    )
  bad = sorted(k for k in wanted if not np.issubdtype(state[k].dtype, np.floating))
  if bad:
    raise ConversionError(f'{where}: non-float tensors {_describe(bad)}')
  bad = sorted(k for k in wanted if not np.all(np.isfinite(state[k])))
  if bad:
    raise ConversionError(f'{where}: non-finite weights (NaN or inf) in {_describe(bad)}')
  leaves = [_convert_tensor(sources[name].kind, state[sources[name].key]) for name in expected]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def _arch(cfg: model_lib.UNetConfig) -> str:
  return (
    f'(ch={cfg.ch}, ch_mult={cfg.ch_mult}, num_res_blocks={cfg.num_res_blocks}, '
    f'attn_res={cfg.attn_res}, resolution={cfg.resolution}, channels={cfg.in_channels})'
  )


def _param_names(cfg: model_lib.UNetConfig) -> dict[str, tuple[int, ...]]:
  return model_lib.flat_param_shapes(target_lib.abstract_model(cfg)[1])


def _split_name(name: str) -> tuple[str, str]:
  module, leaf = name.rsplit('.', 1)
  return module, leaf


def _diffusion(found: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> dict:
  """Schedule: defaults, updated by what the source records, then by explicit overrides."""
  out = dict(DEFAULT_DIFFUSION, **found)
  for k, v in (overrides or {}).items():
    if k not in DEFAULT_DIFFUSION:
      raise ConversionError(
        f'unknown diffusion setting {k!r} (expected {sorted(DEFAULT_DIFFUSION)})'
      )
    if k in found and found[k] != v and not (isinstance(v, float) and math.isclose(found[k], v)):
      raise ConversionError(f'--{k}={v} contradicts {where}, which records {k}={found[k]}')
    out[k] = v
  return out


# ----------------------------------------------------------------------------- pytorch-ddpm

# Our module name (last components) -> pytorch-ddpm module name, inside a ResBlock.
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
    return _state_dict(obj[key], f'{where}[{key!r}]')
  logging.info('%s: a bare state dict (no net_model/ema_model): converting it as is', where)
  return _state_dict(obj, where)


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


def _pytorch_ddpm_sources(cfg: model_lib.UNetConfig) -> dict[str, _Source]:
  out = {}
  for name in _param_names(cfg):
    module, leaf = _split_name(name)
    if module in _DDPM_TOP:
      src, kind = _DDPM_TOP[module], 'conv' if module in ('head', 'tail_conv') else 'linear'
    else:
      block, inner = re.fullmatch(r'((?:down|middle|up)blocks\.\d+)\.(.+)', module).groups()
      src = f'{block}.{_DDPM_RESBLOCK[inner]}'
      kind = (
        'conv1x1' if inner.startswith('attn.') else 'linear' if inner == 'temb_proj' else 'conv'
      )
    out[name] = _leaf_source(src, leaf, kind)
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
  params = _assemble(cfg, _pytorch_ddpm_sources(cfg), state, where, also_used=(_DDPM_TIME_TABLE,))
  table = state[_DDPM_TIME_TABLE]
  if table.shape[1:] != (cfg.ch,):
    raise ConversionError(
      f'{where}: {_DDPM_TIME_TABLE} has shape {table.shape}, expected (T, {cfg.ch})'
    )
  _check_time_table(table, cfg.ch, where)
  diff = _diffusion(
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


# ----------------------------------------------------------------------------- diffusers

# UNet2DModel.__init__ defaults (diffusers 0.42): a field missing from config.json takes these.
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
  cls = config.get('_class_name', 'UNet2DModel')
  if cls != 'UNet2DModel':
    raise ConversionError(f'{where}: _class_name {cls!r} is not UNet2DModel')
  unknown = sorted(k for k in config if not k.startswith('_') and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ConversionError(f'{where}: unsupported UNet2DModel fields {unknown}')
  c = dict(_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith('_')})

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
  head_dim = c['attention_head_dim']
  if head_dim is not None and any(head_dim != boc[i] for i in attn_levels + [len(boc) - 1]):
    refuse(
      'attention_head_dim',
      'only single-head attention (None, or the block width at every '
      'attention block and the middle) is supported',
    )
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
    )
  except ValueError as e:
    raise ConversionError(f'{where}: unsupported architecture ({e})') from e


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


def _diffusers_sources(cfg: model_lib.UNetConfig) -> dict[str, _Source]:
  blocks = _diffusers_block_prefixes(cfg)
  out = {}
  for name in _param_names(cfg):
    module, leaf = _split_name(name)
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
    out[name] = _leaf_source(src, leaf, kind)
  return out


def _rename_deprecated_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


def _scheduler_settings(weights: epath.Path) -> tuple[dict[str, Any], str]:
  """Schedule recorded by a diffusers scheduler config next to the UNet, if there is one."""
  folder = weights.parent
  for path in (
    folder / 'scheduler_config.json',
    folder.parent / 'scheduler' / 'scheduler_config.json',
  ):
    if path.exists():
      break
  else:
    return {}, ''
  try:
    s = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f'{path}: invalid JSON ({e})') from e
  if s.get('prediction_type', 'epsilon') != 'epsilon':
    raise ConversionError(
      f'{path}: prediction_type={s["prediction_type"]!r}; only epsilon prediction is supported'
    )
  if s.get('trained_betas') is not None or s.get('beta_schedule', 'linear') != 'linear':
    raise ConversionError(
      f'{path}: only a linear beta_schedule is supported (found '
      f'beta_schedule={s.get("beta_schedule")!r}, trained_betas)'
    )
  found = {'beta_schedule': 'linear'}
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
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f'{config_path}: invalid JSON ({e})') from e
  cfg = diffusers_config(config, resolution, str(config_path))
  where = str(weights_path)
  state = _rename_deprecated_attention(_state_dict(read_checkpoint(weights_path), where))
  params = _assemble(cfg, _diffusers_sources(cfg), state, where)
  found, sched_path = _scheduler_settings(weights_path)
  return Converted(cfg, params, _diffusion(found, diffusion, sched_path), f'diffusers:{src}')


# ----------------------------------------------------------------------------- writing


def write_target(workdir, converted: Converted) -> None:
  """Writes ``converted`` as a drc_jax target: ``W/checkpoints/<step>`` then ``W/model.json``.

  Refuses a workdir that already holds a target (a later step there would shadow this one).
  """
  workdir = epath.Path(workdir)
  for name in (checkpoints.MODEL_JSON, checkpoints.CHECKPOINT_DIR):
    if (workdir / name).exists():
      raise ConversionError(f'{workdir / name} exists: convert into a fresh workdir')
  checkpoints.save_params_only(
    workdir, jax.tree_util.tree_map(jnp.asarray, converted.params), converted.step
  )
  checkpoints.save_model_json(
    workdir, converted.config, converted.diffusion, source=converted.source
  )


def convert(
  fmt: str,
  src,
  workdir,
  *,
  weights: str = 'ema',
  resolution: int | None = None,
  diffusion: dict[str, Any] | None = None,
) -> Converted:
  """Converts ``src`` (format ``fmt``: 'pytorch-ddpm' or 'diffusers') into the target ``workdir``.

  Returns:
    The converted target (also written to ``workdir``, readable with ``drc_jax.load_target``
    and ``drc_jax.load_target``).
  """
  if fmt == 'pytorch-ddpm':
    converted = convert_pytorch_ddpm(src, weights, resolution, diffusion)
  elif fmt == 'diffusers':
    converted = convert_diffusers(src, resolution, diffusion)
  else:
    raise ConversionError(f'unknown format {fmt!r}; expected one of {FORMATS}')
  write_target(workdir, converted)
  logging.info(
    'converted %s -> %s: %s, %d parameters, schedule %s, step %d',
    converted.source,
    workdir,
    _arch(converted.config),
    model_lib.count_params(converted.params),
    converted.diffusion,
    converted.step,
  )
  return converted


# ----------------------------------------------------------------------------- command line


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so importing never clashes)."""
  flags.DEFINE_enum('format', None, FORMATS, 'Layout of --src.')
  flags.DEFINE_string(
    'src',
    None,
    'pytorch-ddpm: .pt/.pth/.safetensors file; diffusers: model '
    'folder (config.json + weights), pipeline folder or weights file.',
  )
  flags.DEFINE_string('workdir', None, 'Fresh drc_jax workdir to write (local or gs://).')
  flags.DEFINE_enum(
    'weights',
    'ema',
    ['ema', 'net'],
    'pytorch-ddpm: which state dict of a training checkpoint to convert.',
  )
  flags.DEFINE_integer(
    'resolution', None, 'Image side (default: 32 for pytorch-ddpm, sample_size for diffusers).'
  )
  flags.DEFINE_integer('num_timesteps', None, 'T (default: recorded by the source, else 1000).')
  flags.DEFINE_float('beta_start', None, 'Linear schedule start (default: recorded, else 1e-4).')
  flags.DEFINE_float('beta_end', None, 'Linear schedule end (default: recorded, else 0.02).')
  flags.DEFINE_bool('verbose', False, 'Show the traceback of input errors instead of one line.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.format == 'diffusers' and f['weights'].present:
    raise app.UsageError('--weights applies to --format=pytorch-ddpm only')
  overrides = {
    k: getattr(f, k)
    for k in ('num_timesteps', 'beta_start', 'beta_end')
    if getattr(f, k) is not None
  }
  errors.run_reporting_user_errors(
    lambda: convert(
      f.format, f.src, f.workdir, weights=f.weights, resolution=f.resolution, diffusion=overrides
    ),
    f.verbose,
  )


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['format', 'src', 'workdir'])
  app.run(main, flags_parser=errors.flags_parser)
