"""What every import format shares: reading checkpoint files without running code, assembling a
params tree from a state dict (every parameter from exactly one source tensor of the expected
shape, every source tensor used), schedule settings, and writing a target workdir.

Safetensors files are read without torch; pickled files (``.pt``/``.pth``/``.bin``/``.ckpt``)
only with ``torch.load(..., weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath

from drc_jax.core import errors
from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints

DEFAULT_DIFFUSION = {
  'num_timesteps': 1000,
  'beta_schedule': 'linear',
  'beta_start': 1e-4,
  'beta_end': 0.02,
}
_PICKLE_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
_SAFETENSORS_SUFFIX = '.safetensors'


class ConversionError(errors.UserError, ValueError):
  """A checkpoint that cannot be imported; the message names the file, key or config field."""


class RefusedPickle(ConversionError):
  """A pickle that torch.load(weights_only=True) would not load (objects beyond tensors and
  containers, or a damaged file)."""


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted target, ready for ``write_target``.

  Attributes:
    config: architecture of the UNet.
    params: nested dict of float32 numpy arrays in the layout of ``DiffusionModel.create``.
    diffusion: noise schedule description for ``model.json`` (num_timesteps, beta_schedule, ...).
    source: where the weights came from (written to ``model.json``).
    step: training step of the source checkpoint when it records one, else 0.
    autoencoder: latent diffusion targets: (VQConfig, params) of the first stage, else None.
    latent: latent diffusion targets: model.json's latent section (checkpoints.LATENT_KEYS).
  """

  config: model_lib.UNetConfig
  params: Any
  diffusion: dict[str, Any]
  source: str
  step: int = 0
  autoencoder: tuple[Any, Any] | None = None
  latent: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- reading files


def import_torch(path):
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
      PyTorch file ``.pt``/``.pth``/``.bin``/``.ckpt`` (``torch.load(weights_only=True)`` on CPU).

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
    try:
      return safetensors.numpy.load(path.read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError on corrupt headers
      raise ConversionError(f'{path}: unreadable safetensors file ({e})') from e
  if name.endswith(_PICKLE_SUFFIXES):
    torch = import_torch(path)
    local = not re.match(r'^[a-z][a-z0-9+.-]*://', os.fspath(path))
    try:
      return torch.load(
        os.fspath(path) if local else io.BytesIO(path.read_bytes()),
        map_location='cpu',
        weights_only=True,
      )
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... on refused pickles
      raise RefusedPickle(f'{path}: {_refusal(e)}') from e
  raise ConversionError(
    f'{path}: unsupported checkpoint extension (expected '
    f'{_SAFETENSORS_SUFFIX} or one of {_PICKLE_SUFFIXES}; other pickles are '
    f'refused because loading them can run code)'
  )


def _refusal(e: Exception) -> str:
  """What torch.load(weights_only=True) refused, in one sentence and without torch's advice to
  load the file with weights_only=False (which would run whatever the pickle holds)."""
  glob = re.search(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)', str(e))
  if glob:
    return (
      f'refused: it pickles {glob.group(1)}, which is not a tensor or container; drc_jax loads '
      f'only checkpoints of tensors (loading other objects can run code). Re-save the weights '
      f'alone (a state dict) or as .safetensors'
    )
  advice = ('weights_only', 're-running', 'check the documentation', 'arbitrary code')
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  kept = [ln for ln in lines if not any(a in ln.lower() for a in advice)]
  reason = (kept[0] if kept else type(e).__name__)[:200]
  return f'not a readable checkpoint of tensors ({type(e).__name__}: {reason})'


def _is_array(v) -> bool:
  return isinstance(v, np.ndarray) or (hasattr(v, 'detach') and hasattr(v, 'shape'))


def _to_numpy(v) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
  v = v.detach().cpu()
  return v.float().numpy() if v.is_floating_point() else v.numpy()


def state_dict(obj, where: str) -> dict[str, np.ndarray]:
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
class Source:
  """One source tensor for one parameter: its key and how its layout differs from ours."""

  key: str
  # 'conv': OIHW -> HWIO; 'linear': [out, in] -> [in, out]; 'conv1x1': [out, in, 1, 1] -> [in, out];
  # 'conv1d1': [out, in, 1] (a 1-D convolution of width 1) -> [in, out]; 'vector': as is.
  kind: str


def source_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The source tensor shape that converts to our parameter ``shape``."""
  if kind == 'conv':
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if kind == 'linear':
    return (shape[1], shape[0])
  if kind == 'conv1x1':
    return (shape[1], shape[0], 1, 1)
  if kind == 'conv1d1':
    return (shape[1], shape[0], 1)
  return shape


def convert_tensor(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    x = x.transpose(2, 3, 1, 0)
  elif kind == 'linear':
    x = x.T
  elif kind == 'conv1x1':
    x = x[:, :, 0, 0].T
  elif kind == 'conv1d1':
    x = x[:, :, 0].T
  return np.ascontiguousarray(x, dtype=np.float32)


def leaf_source(module: str, leaf: str, kernel_kind: str) -> Source:
  """Our ``module.leaf`` (leaf: kernel, scale or bias) as a PyTorch ``module.weight|bias``."""
  if leaf == 'kernel':
    return Source(f'{module}.weight', kernel_kind)
  return Source(f'{module}.{"weight" if leaf == "scale" else "bias"}', 'vector')


def describe(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def assemble(
  cfg: model_lib.UNetConfig,
  sources: dict[str, Source],
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
  return assemble_tree(
    model_lib.abstract_model(cfg)[1], sources, state, where, f'architecture {arch(cfg)}', also_used
  )


def assemble_tree(
  abstract: Any,
  sources: dict[str, Source],
  state: dict[str, np.ndarray],
  where: str,
  what: str,
  also_used: tuple[str, ...] = (),
) -> Any:
  """``assemble`` for any model: ``abstract`` (a params tree of shapes) gives names and shapes,
  ``what`` names the model in messages ('the inferred architecture ...')."""
  expected = model_lib.flat_param_shapes(abstract)
  assert set(expected) == set(sources), sorted(set(expected) ^ set(sources))
  wanted = {s.key for s in sources.values()} | set(also_used)
  missing = wanted - set(state)
  unexpected = set(state) - wanted
  problems = []
  if missing:
    problems.append(f'missing keys {describe(missing)}')
  if unexpected:
    problems.append(f'unexpected keys {describe(unexpected)}')
  misshapen = [
    f'{s.key}: checkpoint {tuple(state[s.key].shape)} vs expected '
    f'{source_shape(s.kind, expected[name])}'
    for name, s in sources.items()
    if s.key in state and tuple(state[s.key].shape) != source_shape(s.kind, expected[name])
  ]
  if misshapen:
    problems.append('shape mismatch ' + '; '.join(misshapen[:6]))
  if problems:
    raise ConversionError(
      f'{where}: the state dict does not match the inferred {what}: ' + '; '.join(problems)
    )
  bad = sorted(k for k in wanted if not np.issubdtype(state[k].dtype, np.floating))
  if bad:
    raise ConversionError(f'{where}: non-float tensors {describe(bad)}')
  bad = sorted(k for k in wanted if not np.all(np.isfinite(state[k])))
  if bad:
    raise ConversionError(f'{where}: non-finite weights (NaN or inf) in {describe(bad)}')
  leaves = [convert_tensor(sources[name].kind, state[sources[name].key]) for name in expected]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def arch(cfg: model_lib.UNetConfig) -> str:
  return (
    f'(ch={cfg.ch}, ch_mult={cfg.ch_mult}, num_res_blocks={cfg.num_res_blocks}, '
    f'attn_res={cfg.attn_res}, resolution={cfg.resolution}, channels={cfg.in_channels})'
  )


def param_names(cfg: model_lib.UNetConfig) -> dict[str, tuple[int, ...]]:
  return model_lib.flat_param_shapes(model_lib.abstract_model(cfg)[1])


def split_name(name: str) -> tuple[str, str]:
  module, leaf = name.rsplit('.', 1)
  return module, leaf


def diffusion_settings(found: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> dict:
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


# ----------------------------------------------------------------------------- writing


def write_target(workdir, converted: Converted) -> None:
  """Writes ``converted`` as a drc_jax target: ``W/autoencoder/`` (latent targets),
  ``W/checkpoints/<step>``, then ``W/model.json`` (last: it marks the target complete).

  Refuses a workdir that already holds a target (a later step there would shadow this one).
  """
  workdir = epath.Path(workdir)
  for name in (checkpoints.MODEL_JSON, checkpoints.CHECKPOINT_DIR, checkpoints.AUTOENCODER_DIR):
    if (workdir / name).exists():
      raise ConversionError(f'{workdir / name} exists: convert into a fresh workdir')
  if converted.autoencoder is not None:
    vq_cfg, vq_params = converted.autoencoder
    checkpoints.save_autoencoder(
      workdir / checkpoints.AUTOENCODER_DIR, vq_cfg, vq_params, source=converted.source
    )
  checkpoints.save_params_only(
    workdir, jax.tree_util.tree_map(jnp.asarray, converted.params), converted.step
  )
  checkpoints.save_model_json(
    workdir,
    converted.config,
    converted.diffusion,
    source=converted.source,
    latent=converted.latent,
  )
