"""Targets shipped inside the package: EMA weights in safetensors, with their recipe and split.

A shipped target is a directory ``drc_jax/targets/<name>/`` holding

* ``model.json``: architecture and noise schedule (the same document a workdir holds), plus the
  training step;
* ``ema.safetensors``: the EMA weights, one tensor per dotted parameter name (no pickle);
* ``split.json``: the member / non-member split it was trained on (members only were trained on);
* ``training.json``: how it was made (command, seed, config, wall time, a summary of the training
  log) and the SHA-256 of each of the three files above.

It is named ``shipped:<name>`` wherever a target path is taken (``config.audit.checkpoint``,
``drc_jax.load_target``). Loading checks every recorded hash first, so a changed or corrupted
file is an error naming it, never a silently different model; ``model.json`` records what the
target was trained on (``trained_on``), which every audit checks against its split.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
from etils import epath
from safetensors import numpy as st_numpy

from drc_jax.core import records
from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints

PREFIX = 'shipped:'
TARGETS_DIR = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = 'ema.safetensors'
TRAINING_JSON = 'training.json'
SPLIT_JSON = 'split.json'
HASHED = (checkpoints.MODEL_JSON, WEIGHTS, SPLIT_JSON)
# The calibration non-members' scores of every attack (``python -m drc_jax.analysis thresholds``):
# what the Python API's decisions are calibrated on. Recorded in training.json's hashes too.
THRESHOLDS_JSON = 'thresholds.json'


def resolve(path: str) -> str:
  """``shipped:<name>`` -> the directory of that shipped target; other paths unchanged."""
  path = str(path)
  if not path.startswith(PREFIX):
    return path
  name = path[len(PREFIX) :]
  directory = os.path.join(TARGETS_DIR, name)
  if not name or not os.path.isdir(directory):
    known = sorted(os.listdir(TARGETS_DIR)) if os.path.isdir(TARGETS_DIR) else []
    raise checkpoints.CheckpointError(
      f'{path}: no shipped target named {name!r} (shipped: {known})'
    )
  return directory


def is_weights_dir(path) -> bool:
  """True when ``path`` holds a safetensors target (``model.json`` + ``ema.safetensors``)."""
  p = epath.Path(path)
  return (p / checkpoints.MODEL_JSON).exists() and (p / WEIGHTS).exists()


def sha256_file(path) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def verify(directory) -> dict[str, Any]:
  """Checks the recorded SHA-256 of every file; returns ``training.json``.

  The record is required and must cover the weights, ``model.json`` and the split: without it
  nothing would say which weights these are, so a changed file would audit silently.
  """
  d = epath.Path(directory)
  path = d / TRAINING_JSON
  if not path.exists():
    raise checkpoints.CheckpointError(
      f'{path}: missing; a safetensors target is loaded only with its record of hashes '
      f'(written by python -m drc_jax.analysis export)'
    )
  doc = records.read_json(path, checkpoints.CheckpointError)
  recorded = doc.get('sha256')
  unrecorded = [n for n in HASHED if not isinstance(recorded, dict) or n not in recorded]
  if unrecorded:
    raise checkpoints.CheckpointError(f'{path}: records no SHA-256 of {unrecorded}')
  for name, want in recorded.items():
    f = d / name
    if not f.exists():
      raise checkpoints.CheckpointError(f'{f}: missing (recorded in {path})')
    have = sha256_file(f)
    if have != want:
      raise checkpoints.CheckpointError(
        f'{f}: SHA-256 {have[:16]}... differs from the recorded {want[:16]}... in {path}; '
        f'the file was changed or corrupted'
      )
  return doc


def load_params(directory, abstract_params) -> Any:
  """EMA params from ``ema.safetensors``, checked against the model's names and shapes."""
  path = epath.Path(directory) / WEIGHTS
  try:
    flat = st_numpy.load(path.read_bytes())
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise checkpoints.CheckpointError(f'{path}: unreadable safetensors file ({e})') from e
  expected = model_lib.flat_param_shapes(abstract_params)
  detail = checkpoints.describe_mismatch(expected, {k: tuple(v.shape) for k, v in flat.items()})
  if detail:
    raise checkpoints.CheckpointError(
      f'{path}: weights do not match the model in model.json: {detail}'
    )
  bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
  if bad:
    raise checkpoints.CheckpointError(f'{path}: non-finite weights in {bad[:5]}')
  return model_lib.unflatten_params(abstract_params, flat)


def calibrated_attacks(directory) -> list[str] | None:
  """The attacks ``thresholds.json`` in a target directory holds calibration scores for; None when
  the target ships none.

  Raises:
    CheckpointError: the file is damaged.
  """
  path = epath.Path(directory) / THRESHOLDS_JSON
  if not path.exists():
    return None
  scores = records.read_json(path, checkpoints.CheckpointError).get('nonmember_scores')
  return sorted(scores) if isinstance(scores, dict) else []


def read_thresholds(directory, attacks) -> dict[str, np.ndarray] | None:
  """{attack: the calibration non-members' scores, sorted descending} for ``attacks`` from
  ``thresholds.json`` in a target directory; None when the target ships none.

  Raises:
    CheckpointError: the file is damaged, or lacks an attack of ``attacks`` (naming it).
  """
  path = epath.Path(directory) / THRESHOLDS_JSON
  if not path.exists():
    return None
  doc = records.read_json(path, checkpoints.CheckpointError)
  scores = doc.get('nonmember_scores')
  missing = [a for a in attacks if not isinstance(scores, dict) or a not in scores]
  if missing:
    raise checkpoints.CheckpointError(
      f'{path}: no calibration scores for {missing} (it has {sorted(scores or {})}); '
      f'write them with python -m drc_jax.analysis thresholds'
    )
  return {a: np.sort(np.asarray(scores[a], np.float64))[::-1] for a in attacks}


def read_drc_rule(directory) -> dict | None:
  """How ``thresholds.json`` in a target directory scored DRC: ``{'aggregation', 'vote_threshold'}``
  (files written before the rule was recorded: the mean over K); None when the target ships none.

  Raises:
    CheckpointError: the file is damaged.
  """
  path = epath.Path(directory) / THRESHOLDS_JSON
  if not path.exists():
    return None
  rule = records.read_json(path, checkpoints.CheckpointError).get('drc_rule')
  if rule is None:
    return {'aggregation': 'mean', 'vote_threshold': None}
  if not isinstance(rule, dict) or 'aggregation' not in rule:
    raise checkpoints.CheckpointError(f'{path}: drc_rule must hold the aggregation, got {rule!r}')
  return {'aggregation': rule['aggregation'], 'vote_threshold': rule.get('vote_threshold')}
