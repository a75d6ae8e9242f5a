"""What the encoder converters share: finding the weights file, block counting, and assembling an
encoder's params from a state dict under the same strict rules as the UNet import.

Every parameter of the Flax encoder comes from its planned source tensor(s) of the expected shape
(a fused qkv kernel may come from three tensors, concatenated), every tensor of the state dict is
either used or explicitly dropped by the converter (classifier heads, text towers), and every
problem is a ``ConversionError`` that names the keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from drc_jax.convert.common import (
  ConversionError,
  convert_tensor,
  describe,
  read_checkpoint,
  source_shape,
  state_dict,
)
from drc_jax.models import unet as unet_lib
from drc_jax.targets import encoders


@dataclasses.dataclass(frozen=True)
class Take:
  """The source of one parameter: tensor key(s) and how their layout differs from ours.

  Attributes:
    keys: one key, or several whose converted tensors are concatenated along our last axis
      (separate q/k/v projections into one fused qkv).
    kind: 'linear' ([out, in] -> [in, out]), 'conv' (OIHW -> HWIO) or 'vector' (as is).
  """

  keys: tuple[str, ...]
  kind: str

  @classmethod
  def one(cls, key: str, kind: str) -> Take:
    return cls((key,), kind)


def leaf(module: str, name: str, kind: str) -> Take:
  """Our ``module`` leaf ``name`` (kernel/scale/bias) from PyTorch's ``module.weight|bias``."""
  if name == 'kernel':
    return Take.one(f'{module}.weight', kind)
  return Take.one(f'{module}.{"weight" if name == "scale" else "bias"}', 'vector')


def find_weights(src, names: tuple[str, ...], what: str) -> epath.Path:
  """``src`` itself when a file, else the first of ``names`` inside the folder ``src``."""
  src = epath.Path(src)
  if not src.exists():
    raise ConversionError(f'{src}: not found')
  if not src.is_dir():
    return src
  for name in names:
    if (src / name).exists():
      return src / name
  index = [n for n in (f'{m}.index.json' for m in names) if (src / n).exists()]
  if index:
    raise ConversionError(f'{src / index[0]}: sharded weights are not supported ({what})')
  raise ConversionError(f'{src}: no weights file for {what} (looked for {", ".join(names)})')


def unwrap(obj: Any, wrappers: tuple[str, ...], where: str) -> dict[str, np.ndarray]:
  """The state dict in ``obj``: ``obj[w]`` for the first wrapper key present, else ``obj``."""
  if isinstance(obj, Mapping):
    for w in wrappers:
      if w in obj and isinstance(obj[w], Mapping):
        logging.info('%s: converting the state dict under %r', where, w)
        return state_dict(obj[w], f'{where}[{w!r}]')
  return state_dict(obj, where)


def read_state(path, wrappers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  return unwrap(read_checkpoint(path), wrappers, str(path))


def block_count(state: Mapping[str, Any], prefix: str, where: str) -> int:
  """Number of blocks ``{prefix}.0.``, ``{prefix}.1.``, ...; indices must be 0..n-1, n >= 1."""
  pat = re.compile(rf'{re.escape(prefix)}\.(\d+)\.')
  idx = sorted({int(m.group(1)) for k in state if (m := pat.match(k))})
  if not idx:
    raise ConversionError(f'{where}: no {prefix}.0.* keys (cannot count the transformer blocks)')
  if idx != list(range(len(idx))):
    raise ConversionError(f'{where}: {prefix} indices {idx} are not 0..{len(idx) - 1}')
  return len(idx)


def require(state: Mapping[str, Any], key: str, ndim: int, where: str) -> np.ndarray:
  """state[key], which the architecture is read from; it must exist with ``ndim`` axes."""
  if key not in state:
    raise ConversionError(f'{where}: missing key {key} (cannot read the architecture)')
  if state[key].ndim != ndim:
    raise ConversionError(f'{where}: {key} has shape {tuple(state[key].shape)}, expected {ndim}-D')
  return state[key]


def square_grid(n_tokens: int, key: str, where: str) -> int:
  """Grid side of ``n_tokens`` = 1 (CLS) + g * g position embeddings."""
  g = int(round((n_tokens - 1) ** 0.5))
  if n_tokens < 2 or g * g != n_tokens - 1:
    extra = ''
    if int(round(n_tokens**0.5)) ** 2 == n_tokens:
      extra = ' (no entry for the CLS token: no_embed_class models are not supported)'
    raise ConversionError(f'{where}: {key} has {n_tokens} positions, not 1 + a square grid{extra}')
  return g


def _expected_sources(take: Take, shape: tuple[int, ...], where: str, name: str):
  n = len(take.keys)
  if shape[-1] % n:
    raise ConversionError(f'{where}: {name} {shape} cannot be split into {n} sources')
  part = shape[:-1] + (shape[-1] // n,)
  return source_shape(take.kind, part)


def assemble(
  family: str,
  config,
  plan: dict[str, Take],
  state: dict[str, np.ndarray],
  where: str,
  dropped: Iterable[str] = (),
) -> Any:
  """Builds the params tree of ``family`` at ``config`` from ``state`` (strictly).

  Args:
    family: a key of ``encoders.FAMILIES``.
    config: its config; the abstract params give the expected names and shapes.
    plan: our dotted parameter name -> its source.
    state: the source state dict (float tensors as numpy).
    where: file name for messages.
    dropped: source keys deliberately not converted (classifier head, text tower, buffers).

  Returns:
    Nested dict of float32 numpy arrays shaped like ``encoders.abstract_params(family, config)``.
  """
  abstract = encoders.abstract_params(family, config)
  expected = unet_lib.flat_param_shapes(abstract)
  assert set(expected) == set(plan), sorted(set(expected) ^ set(plan))
  wanted = {k for t in plan.values() for k in t.keys}
  dropped = set(dropped)
  missing = wanted - set(state)
  unexpected = set(state) - wanted - dropped
  problems = []
  if missing:
    problems.append(f'missing keys {describe(missing)}')
  if unexpected:
    problems.append(f'unexpected keys {describe(unexpected)}')
  misshapen = []
  for name, take in plan.items():
    want = _expected_sources(take, expected[name], where, name)
    misshapen += [
      f'{k}: checkpoint {tuple(state[k].shape)} vs expected {want}'
      for k in take.keys
      if k in state and tuple(state[k].shape) != tuple(want)
    ]
  if misshapen:
    problems.append('shape mismatch ' + '; '.join(misshapen[:6]))
  if problems:
    raise ConversionError(
      f'{where}: the state dict does not match the {family} architecture read from it '
      f'({config}): ' + '; '.join(problems)
    )
  bad = sorted(k for k in wanted if not np.issubdtype(state[k].dtype, np.floating))
  if bad:
    raise ConversionError(f'{where}: non-float tensors {describe(bad)}')
  bad = sorted(k for k in wanted if not np.all(np.isfinite(state[k])))
  if bad:
    raise ConversionError(f'{where}: non-finite weights (NaN or inf) in {describe(bad)}')
  if dropped & set(state):
    logging.info('%s: not converted (not part of the encoder): %s', where, describe(dropped))
  leaves = []
  for name in expected:
    take = plan[name]
    parts = [convert_tensor(take.kind, state[k]) for k in take.keys]
    leaves.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def block_plan(ours: str, theirs: str, names: Mapping[str, str]) -> dict[str, Take]:
  """Plan of one transformer block: ``names`` maps our sub-module to theirs (qkv handled apart).

  Keys of ``names``: 'norm1', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2' (our ``vit.Block``).
  """
  out = {}
  for mod, src in names.items():
    if mod.startswith('norm'):
      out[f'{ours}.{mod}.scale'] = leaf(f'{theirs}.{src}', 'scale', 'vector')
      out[f'{ours}.{mod}.bias'] = leaf(f'{theirs}.{src}', 'bias', 'vector')
    else:
      out[f'{ours}.{mod}.kernel'] = leaf(f'{theirs}.{src}', 'kernel', 'linear')
      out[f'{ours}.{mod}.bias'] = leaf(f'{theirs}.{src}', 'bias', 'linear')
  return out


def heads_for(width: int, heads: int | None, key: str, where: str, head_width: int = 64) -> int:
  """Attention heads: given, else width // head_width (64 in timm's, DINO's and CLIP's ViTs).

  The head count is not stored in the weights (a fused qkv is [3 D, D] for any count).
  """
  if heads is None:
    if head_width < 1 or width % head_width:
      raise ConversionError(
        f'{where}: {key} width {width} is not a multiple of the head width {head_width}, so the '
        'head count cannot be derived: give --heads'
      )
    return width // head_width
  if heads < 1 or width % heads:
    raise ConversionError(f'{where}: --heads={heads} does not divide the width {width} ({key})')
  return heads


def checked_config(cls, where: str, **kw):
  try:
    return cls(**kw)
  except ValueError as e:
    raise ConversionError(f'{where}: unsupported architecture ({e})') from e
