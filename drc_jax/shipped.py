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
import json
import os
import re
import time
from typing import Any

import numpy as np
from etils import epath

from drc_jax import checkpoints, fileio
from drc_jax.models import unet as model_lib

PREFIX = 'shipped:'
TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'targets')
WEIGHTS = 'ema.safetensors'
TRAINING_JSON = 'training.json'
SPLIT_JSON = 'split.json'
HASHED = (checkpoints.MODEL_JSON, WEIGHTS, SPLIT_JSON)


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
  """Checks the recorded SHA-256 of every file; returns ``training.json`` ({} when absent)."""
  d = epath.Path(directory)
  path = d / TRAINING_JSON
  if not path.exists():
    return {}
  try:
    doc = json.loads(path.read_text())
    recorded = doc['sha256']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise checkpoints.CheckpointError(f'{path}: invalid training record ({e!r})') from e
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
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

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


def training_summary(log_text: str, every: int = 1000) -> list[dict[str, float]]:
  """(step, loss, steps/s) of the training log lines at multiples of ``every`` steps."""
  out = []
  for m in re.finditer(
    r'step (\d+)/\d+ loss ([0-9.eE+-]+) grad_norm ([0-9.eE+-]+) '
    r'([0-9.]+) steps/s',
    log_text,
  ):
    step = int(m.group(1))
    if step % every == 0:
      out.append(
        {
          'step': step,
          'loss': float(m.group(2)),
          'grad_norm': float(m.group(3)),
          'steps_per_s': float(m.group(4)),
        }
      )
  return out


def export(
  workdir: str, out: str, *, step: int, config, command: str, log_path: str = ''
) -> dict[str, Any]:
  """Writes the shipped-target directory ``out`` from checkpoint ``step`` of ``workdir``.

  The config's ``train.steps`` must equal ``step`` (the shipped recipe must reproduce it).
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  from drc_jax import target as target_lib  # pylint: disable=g-import-not-at-top

  if int(config.train.steps) != int(step):
    raise ValueError(
      f'config.train.steps ({config.train.steps}) must equal the exported step '
      f'{step}: the shipped recipe has to reproduce the shipped weights'
    )
  ckpt = epath.Path(workdir) / checkpoints.CHECKPOINT_DIR / str(step)
  target = target_lib.load_target(str(ckpt))
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  flat = {
    k: np.ascontiguousarray(np.asarray(v, np.float32))
    for k, v in model_lib.flat_params(target.params).items()
  }
  fileio.atomic_write_bytes(out_dir / WEIGHTS, st_numpy.save(flat))
  model_doc = json.loads((epath.Path(workdir) / checkpoints.MODEL_JSON).read_text())
  model_doc['step'] = int(step)
  if 'trained_on' not in model_doc:  # trained before drc_jax recorded it: derive it from the split
    from drc_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from drc_jax import splits as splits_lib  # pylint: disable=g-import-not-at-top

    source = data_lib.make_source(config.data)
    split = splits_lib.resolve(config.split, source, workdir, write=False)
    model_doc['trained_on'] = splits_lib.training_data(config.data, source, split)
  fileio.atomic_write_text(out_dir / checkpoints.MODEL_JSON, json.dumps(model_doc, indent=1))
  fileio.atomic_write_text(out_dir / SPLIT_JSON, (epath.Path(workdir) / SPLIT_JSON).read_text())
  log_text = epath.Path(log_path).read_text() if log_path else ''
  doc = {
    'command': command,
    'seed': int(config.seed),
    'step': int(step),
    'exported': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
    'num_params': model_lib.count_params(target.params),
    'training_log': [r for r in training_summary(log_text) if r['step'] <= step],
    'config': json.loads(json.dumps(config.to_dict(), default=list)),
    'sha256': {name: sha256_file(out_dir / name) for name in HASHED},
  }
  fileio.atomic_write_text(out_dir / TRAINING_JSON, json.dumps(doc, indent=1))
  return doc


def main(argv):
  """``python -m drc_jax.shipped --config=C --workdir=W --step=N --out=DIR [--log=train.log]``."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv
  f = flags.FLAGS
  command = f'python -m drc_jax.main --config={f.config_path} --mode=train --workdir=W'
  doc = export(f.workdir, f.out, step=f.step, config=f.config, command=command, log_path=f.log)
  print(json.dumps({k: doc[k] for k in ('step', 'num_params', 'sha256')}, indent=1))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file('config', None, 'The config that trained the target.')
  flags.DEFINE_string(
    'config_path',
    'configs/fashion_mnist.py',
    'How the config is named in the recorded training command.',
  )
  flags.DEFINE_string('workdir', None, 'The training workdir.')
  flags.DEFINE_integer('step', None, 'The checkpoint step to ship (= config.train.steps).')
  flags.DEFINE_string('out', None, 'The shipped-target directory to write.')
  flags.DEFINE_string('log', '', 'The training log (its loss lines are summarised).')
  app.run(main)
