"""Target checkpoints: orbax CheckpointManager in ``W/checkpoints`` plus ``W/model.json``.

``model.json`` holds everything needed to rebuild the target without the config that trained it
(UNet architecture and noise schedule), so an audit, a converted PyTorch checkpoint and
``drc_jax.load_target`` all read the same thing. Restores go into an abstract target built with
``jax.eval_shape``; a checkpoint that does not match the architecture is an error naming the key.
"""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from drc_jax import errors
from drc_jax import fileio
from drc_jax import model as model_lib
from drc_jax import schedule as schedule_lib

MODEL_JSON = 'model.json'
CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(errors.UserError, ValueError):
  """A missing or mismatched checkpoint; the message names the path or key."""


def save_model_json(workdir, unet: model_lib.UNetConfig, diffusion: dict[str, Any],
                    source: str = 'drc_jax') -> None:
  doc = {'unet': unet.to_dict(), 'diffusion': dict(diffusion), 'source': source}
  fileio.atomic_write_text(epath.Path(workdir) / MODEL_JSON, json.dumps(doc, indent=1))


def read_model_doc(workdir) -> dict[str, Any]:
  """The parsed ``W/model.json``; a missing or unparsable file is a CheckpointError naming it."""
  path = epath.Path(workdir) / MODEL_JSON
  if not path.exists():
    raise CheckpointError(f'{path}: not found; {workdir} holds no drc_jax target (train one with '
                          f'--mode=train or convert one with python -m drc_jax.convert)')
  try:
    doc = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path}: not valid JSON ({e}); the target description is damaged: '
                          f'restore it or use another --workdir') from e
  if not isinstance(doc, dict):
    raise CheckpointError(f'{path}: expected a JSON object, found {type(doc).__name__}')
  return doc


def load_model_json(workdir) -> tuple[model_lib.UNetConfig, dict[str, Any]]:
  path = epath.Path(workdir) / MODEL_JSON
  doc = read_model_doc(workdir)
  try:
    unet, diffusion = model_lib.UNetConfig.from_dict(doc['unet']), dict(doc['diffusion'])
    schedule_from(diffusion)  # a schedule that cannot be built is a damaged description too
    return unet, diffusion
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: invalid model description ({e!r})') from e


def is_imported(workdir) -> bool:
  """True when ``workdir`` holds a target converted from elsewhere (never trained here)."""
  path = epath.Path(workdir) / MODEL_JSON
  return path.exists() and read_model_doc(workdir).get('source', 'drc_jax') != 'drc_jax'


def schedule_from(diffusion: dict[str, Any]) -> schedule_lib.NoiseSchedule:
  kind = diffusion.get('beta_schedule', 'linear')
  if kind == 'linear':
    return schedule_lib.NoiseSchedule.create('linear', diffusion['num_timesteps'],
                                             beta_start=diffusion['beta_start'],
                                             beta_end=diffusion['beta_end'])
  return schedule_lib.NoiseSchedule.create(kind, diffusion['num_timesteps'])


def _absolute(path) -> epath.Path:
  """Orbax needs absolute paths: local relative paths are made absolute (gs:// stay as they are)."""
  p = epath.Path(path)
  return p if '://' in str(path) else epath.Path(p.absolute())


def manager(workdir, keep: int = 3) -> ocp.CheckpointManager:
  path = _absolute(workdir) / CHECKPOINT_DIR
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False))


def _describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  shape = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
  parts = []
  if missing:
    parts.append(f'missing keys {missing[:5]}')
  if extra:
    parts.append(f'unexpected keys {extra[:5]}')
  if shape:
    parts.append('shape mismatch ' + ', '.join(
        f'{k}: checkpoint {found[k]} vs model {expected[k]}' for k in shape[:5]))
  return '; '.join(parts)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores the full training state at ``step`` (default: latest) into ``abstract_state``."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{mngr.directory}: no checkpoint found')
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{mngr.directory}/{step}: checkpoint does not match the training '
                          f'state of this config ({str(e)[:500]})') from e


def restore_ema(step_dir, abstract_params):
  """Reads only ``ema_params`` of a checkpoint step (a training state or a converted model).

  The stored names and shapes are checked against the model first: a mismatch names the keys.
  """
  item_dir = _absolute(step_dir) / 'default'
  ckptr = ocp.PyTreeCheckpointer()
  try:
    tree = ckptr.metadata(item_dir).item_metadata.tree
  except (FileNotFoundError, ValueError, AttributeError) as e:
    raise CheckpointError(f'{item_dir}: unreadable checkpoint ({e})') from e
  if 'ema_params' not in tree:
    raise CheckpointError(f'{item_dir}: no ema_params in checkpoint (found {sorted(tree)})')
  found = model_lib.flat_param_shapes(tree['ema_params'])
  detail = _describe_mismatch(model_lib.flat_param_shapes(abstract_params), found)
  if detail:
    raise CheckpointError(f'{item_dir}: checkpoint does not match the model in model.json: '
                          f'{detail}')
  item = {'ema_params': abstract_params}
  restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  return restored['ema_params']


def save_params_only(workdir, params, step: int = 0) -> None:
  """Writes a checkpoint holding only EMA weights (converted models): {'ema_params': params}."""
  mngr = manager(workdir, keep=1)
  mngr.save(step, args=ocp.args.StandardSave({'ema_params': params}), force=True)
  mngr.wait_until_finished()
  mngr.close()
