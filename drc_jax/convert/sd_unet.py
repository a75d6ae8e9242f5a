"""Stable Diffusion's UNet: a diffusers ``UNet2DConditionModel`` folder (the ``unet/`` of an SD 1.x
or 2.x pipeline, inpainting variants included) read into ``models/unet_cond.py``'s params.

The folder holds ``config.json`` and the weights: ``diffusion_pytorch_model.safetensors`` or
``.bin``, or shards listed by ``diffusion_pytorch_model.safetensors.index.json`` (or
``.bin.index.json``; its ``weight_map`` names each tensor's file). ``variant='fp16'`` reads
``diffusion_pytorch_model.fp16.safetensors`` (and its index); half-precision tensors become
float32. A pipeline folder (with ``unet/``) is accepted for the UNet folder.

Strict as the other converters: the architecture comes from ``config.json`` (an unknown field, or a
setting this UNet does not compute, is refused by name); every parameter comes from exactly one
tensor of the expected shape (``ConversionError`` naming the missing, unexpected or misshapen keys
before anything is returned), every tensor is used. The layouts: conv kernels OIHW -> HWIO; Linear
weights ``[out, in]`` transposed; the transformers' ``proj_in``/``proj_out`` are 1x1 convs
``[out, in, 1, 1]`` (SD 1.x) or Linears ``[out, in]`` (``use_linear_projection``, SD 2.x), both
read into our ``[in, out]`` Linear kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from drc_jax.convert.common import (
  ConversionError,
  Source,
  assemble_tree,
  leaf_source,
  read_checkpoint,
  split_name,
  state_dict,
)
from drc_jax.core import records
from drc_jax.models import unet as unet_lib
from drc_jax.models import unet_cond

WEIGHTS = 'diffusion_pytorch_model'


def sd_unet_sources(cfg: unet_cond.UNetCondConfig, abstract: Any) -> dict[str, Source]:
  """Our parameter name -> its diffusers state-dict tensor (our module paths are diffusers')."""
  out = {}
  for name, shape in unet_lib.flat_param_shapes(abstract).items():
    module, leaf = split_name(name)
    if len(shape) == 4:
      kind = 'conv'
    elif module.endswith(('.proj_in', '.proj_out')):
      kind = 'linear' if cfg.use_linear_projection else 'conv1x1'
    else:
      kind = 'linear'
    out[name] = leaf_source(module, leaf, kind)
  return out


def _unet_folder(src) -> epath.Path:
  src = epath.Path(src)
  if not src.is_dir():
    raise ConversionError(f'{src}: not a folder (expected a diffusers UNet2DConditionModel folder)')
  if not (src / 'config.json').exists() and (src / 'unet' / 'config.json').exists():
    src = src / 'unet'  # a pipeline folder (model_index.json, unet/, text_encoder/, ...)
  if not (src / 'config.json').exists():
    raise ConversionError(f'{src / "config.json"}: not found (a diffusers UNet needs its config)')
  return src


def _read_sharded(index: epath.Path) -> dict[str, np.ndarray]:
  """The state dict of the shards an ``*.index.json`` lists, each key from the file it names."""
  doc = records.read_json(index, ConversionError)
  wmap = doc.get('weight_map') if isinstance(doc, dict) else None
  if not isinstance(wmap, dict) or not wmap:
    raise ConversionError(f'{index}: no weight_map (expected {{tensor key: shard file}})')
  state: dict[str, np.ndarray] = {}
  for shard in sorted(set(wmap.values())):
    path = index.parent / str(shard)
    if '/' in str(shard) or not path.exists():
      raise ConversionError(f'{index}: shard {shard!r} not found beside it')
    part = state_dict(read_checkpoint(path), str(path))
    listed = {k for k, v in wmap.items() if v == shard}
    if set(part) != listed:
      extra, absent = sorted(set(part) - listed), sorted(listed - set(part))
      raise ConversionError(
        f'{path}: does not hold what {index.name} lists (unlisted keys {extra[:5]}, '
        f'absent keys {absent[:5]})'
      )
    state.update(part)
  return state


def read_state(folder: epath.Path, variant: str | None = None) -> tuple[dict[str, Any], str]:
  """(state dict, where) of a UNet folder's weights: one file, or shards with an index."""
  stem = WEIGHTS if variant is None else f'{WEIGHTS}.{variant}'
  for ext in ('.safetensors', '.bin'):
    path = folder / f'{stem}{ext}'
    if path.exists():
      return state_dict(read_checkpoint(path), str(path)), str(path)
  for ext in ('.safetensors', '.bin'):
    index = folder / f'{stem}{ext}.index.json'
    if index.exists():
      return _read_sharded(index), str(index)
  raise ConversionError(
    f'{folder}: no {stem}.safetensors or .bin (nor a sharded {stem}.safetensors.index.json)'
  )


def convert_unet_cond(folder, variant: str | None = None) -> tuple[unet_cond.UNetCondConfig, Any]:
  """Reads a diffusers ``UNet2DConditionModel`` into (config, params).

  Args:
    folder: the ``unet/`` folder (``config.json`` + weights), or a pipeline folder holding one.
    variant: a weights variant (``'fp16'``: ``diffusion_pytorch_model.fp16.safetensors``).

  Returns:
    The ``UNetCondConfig`` and a params tree of float32 numpy arrays in the layout of
    ``unet_cond.CondUNet.create``: ``CondUNet.abstract(config)[0].apply(params, z, t, context)``.

  Raises:
    ConversionError: naming the config field refused, or the missing, unexpected or misshapen
      tensor keys.
  """
  folder = _unet_folder(folder)
  config_path = folder / 'config.json'
  config = records.read_json(config_path, ConversionError)
  try:
    cfg = unet_cond.UNetCondConfig.from_diffusers_config(config, str(config_path))
  except ValueError as e:
    raise ConversionError(str(e)) from e
  state, where = read_state(folder, variant)
  _, abstract = unet_cond.abstract_model(cfg)
  params = assemble_tree(
    abstract, sd_unet_sources(cfg, abstract), state, where, f'UNet2DConditionModel {cfg}'
  )
  return cfg, params
