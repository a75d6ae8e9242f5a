"""Stable Diffusion's text encoder: a transformers ``CLIPTextModel`` folder read into
``drc_jax.models.clip_text``.

The folder is a pipeline's ``text_encoder/`` (``config.json`` + ``model.safetensors``, a sharded
``model.safetensors.index.json`` with its shards, or ``pytorch_model.bin``), or the pipeline
folder holding it. The architecture comes from ``config.json``
(``CLIPTextConfig.from_hf_config``: a field or value we do not compute is refused by name).

Keys (transformers' ``CLIPTextModel`` state dict; the ``text_model.`` prefix is that of
transformers 4.x's files, SD's among them; transformers 5.x saves the same keys without it, and
either is read) -> our params:

* ``text_model.embeddings.token_embedding.weight`` -> ``token_embedding.embedding`` (as is)
* ``text_model.embeddings.position_embedding.weight`` -> ``position_embedding`` (as is)
* ``text_model.encoder.layers.{i}.{layer_norm1,layer_norm2}.{weight,bias}`` -> ``.{scale,bias}``
* ``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}`` and
  ``...mlp.{fc1,fc2}.{weight,bias}`` -> ``.{kernel,bias}`` (weights transposed: [out, in] -> [in,
  out])
* ``text_model.final_layer_norm.{weight,bias}`` -> ``final_layer_norm.{scale,bias}``

Every parameter comes from exactly one tensor of the expected shape and every tensor is used
(the buffer ``text_model.embeddings.position_ids``, which older transformers saved, is dropped),
or ``ConversionError`` names the keys. A ``CLIPTextModelWithProjection``'s ``text_projection`` is
refused (it is not part of ``last_hidden_state``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from drc_jax.convert.common import (
  ConversionError,
  Source,
  assemble_tree,
  leaf_source,
  read_checkpoint,
  state_dict,
)
from drc_jax.core import records
from drc_jax.models import clip_text
from drc_jax.models import unet as unet_lib

WEIGHT_NAMES = ('model.safetensors', 'pytorch_model.bin')
INDEX_NAME = 'model.safetensors.index.json'
BUFFERS = ('text_model.embeddings.position_ids', 'embeddings.position_ids')
_TM = 'text_model'


def text_config(doc: dict[str, Any], where: str = 'config.json') -> clip_text.CLIPTextConfig:
  """The CLIPTextConfig of a transformers text-encoder ``config.json`` document.

  Raises:
    ConversionError: naming ``where`` and the field our text tower does not compute.
  """
  try:
    return clip_text.CLIPTextConfig.from_hf_config(doc, where)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def sources(params: Any, prefix: str = _TM) -> dict[str, Source]:
  """Our dotted parameter name -> its transformers key, for every leaf of ``params``.

  ``prefix``: 'text_model' (transformers 4.x files, SD's) or '' (transformers 5.x writes a
  ``CLIPTextModel``'s keys without it).
  """
  p = f'{prefix}.' if prefix else ''
  out = {}
  for name in unet_lib.flat_param_shapes(params):
    module, _, leaf = name.rpartition('.')
    if name == 'token_embedding.embedding':
      out[name] = Source(f'{p}embeddings.token_embedding.weight', 'vector')
    elif name == 'position_embedding':
      out[name] = Source(f'{p}embeddings.position_embedding.weight', 'vector')
    elif module.startswith('layers.'):
      out[name] = leaf_source(f'{p}encoder.{module}', leaf, 'linear')
    else:  # final_layer_norm
      out[name] = leaf_source(f'{p}{module}', leaf, 'linear')
  return out


def convert_state(
  cfg: clip_text.CLIPTextConfig, state: dict[str, np.ndarray], where: str
) -> dict[str, Any]:
  """Params of ``CLIPTextEncoder.create(cfg)[1]``'s layout from a ``CLIPTextModel`` state dict.

  Args:
    cfg: the architecture (from config.json).
    state: key -> numpy array (e.g. ``safetensors.numpy.load_file(...)``).
    where: the file, for messages.

  Returns:
    Nested dict of float32 numpy arrays.

  Raises:
    ConversionError: missing, unexpected, misshapen, non-float or non-finite tensors, by key.
  """
  state = {k: v for k, v in state_dict(state, where).items() if k not in BUFFERS}
  if 'text_projection.weight' in state:
    raise ConversionError(
      f'{where}: text_projection.weight: a CLIPTextModelWithProjection is not supported (Stable '
      "Diffusion's text encoder is a CLIPTextModel; its context is last_hidden_state)"
    )
  prefix = _TM if any(k.startswith(f'{_TM}.') for k in state) else ''
  _, abstract = clip_text.abstract_text_encoder(cfg)
  return assemble_tree(abstract, sources(abstract, prefix), state, where, f'CLIP text tower {cfg}')


def _folder(src: epath.Path) -> epath.Path:
  if not src.is_dir():
    raise ConversionError(f'{src}: not a folder (expected a transformers CLIPTextModel folder)')
  if not (src / 'config.json').exists() and (src / 'text_encoder' / 'config.json').exists():
    return src / 'text_encoder'  # a pipeline folder (model_index.json, text_encoder/, ...)
  return src


def _read_sharded(index: epath.Path) -> dict[str, np.ndarray]:
  """The state dict of a sharded safetensors checkpoint (every shard its index names)."""
  try:
    weight_map = json.loads(index.read_text())['weight_map']
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f'{index}: not a safetensors index with a weight_map ({e})') from e
  if not isinstance(weight_map, dict) or not weight_map:
    raise ConversionError(f'{index}: weight_map is not a non-empty object')
  state, origin = {}, {}
  for shard in sorted({str(v) for v in weight_map.values()}):
    path = index.parent / shard
    if '/' in shard or not shard.endswith('.safetensors'):
      raise ConversionError(f'{index}: shard {shard!r} is not a .safetensors file in the folder')
    part = state_dict(read_checkpoint(path), str(path))
    twice = sorted(set(part) & set(state))
    if twice:
      raise ConversionError(f'{path}: key {twice[0]} is also in shard {origin[twice[0]]}')
    state |= part
    origin |= dict.fromkeys(part, shard)
  wrong = sorted(k for k in set(weight_map) | set(origin) if weight_map.get(k) != origin.get(k))
  if wrong:
    k = wrong[0]
    raise ConversionError(
      f'{index}: key {k} is listed in shard {weight_map.get(k)} but found in {origin.get(k)}'
    )
  return state


def _read_state(folder: epath.Path) -> tuple[dict[str, np.ndarray], str]:
  for name in WEIGHT_NAMES:
    if (folder / name).exists():
      path = folder / name
      return state_dict(read_checkpoint(path), str(path)), str(path)
  if (folder / INDEX_NAME).exists():
    return _read_sharded(folder / INDEX_NAME), str(folder / INDEX_NAME)
  raise ConversionError(f'{folder}: no {", ".join(WEIGHT_NAMES)} or {INDEX_NAME}')


def convert_text_encoder(folder) -> tuple[clip_text.CLIPTextConfig, dict[str, Any]]:
  """Reads a transformers ``CLIPTextModel`` folder (an SD pipeline's ``text_encoder/``).

  Args:
    folder: the ``text_encoder/`` folder (``config.json`` + weights), or a pipeline folder with
      a ``text_encoder/`` in it.

  Returns:
    (config, params): params is the nested dict of float32 numpy arrays in the layout of
    ``CLIPTextEncoder.create(config)[1]``.

  Raises:
    ConversionError: naming the folder, file, config field or state-dict keys refused.
  """
  folder = _folder(epath.Path(folder))
  config_path = folder / 'config.json'
  cfg = text_config(records.read_json(config_path, ConversionError), str(config_path))
  state, where = _read_state(folder)
  return cfg, convert_state(cfg, state, where)
