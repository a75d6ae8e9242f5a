"""Target checkpoints: orbax CheckpointManager in ``W/checkpoints`` plus ``W/model.json``.

``model.json`` holds everything needed to rebuild the target without the config that trained it
(UNet architecture and noise schedule), so an audit, a converted PyTorch checkpoint and
``drc_jax.load_target`` all read the same thing. Restores go into an abstract target built with
``jax.eval_shape``; a checkpoint that does not match the architecture is an error naming the key.

A latent diffusion target adds a ``latent`` section to ``model.json`` (latent and image shapes,
downsampling and scaling factors) and its first stage, the VQ autoencoder, in ``W/autoencoder/``:
``weights.safetensors`` (our parameter layout) and ``config.json`` (architecture, source and the
SHA-256 of the weights, checked on load). The UNet checkpoint is the same as a pixel target's.

Integrity: every checkpoint step records, in its orbax step metadata (written with the checkpoint,
atomically), the SHA-256 of its EMA weights and, for a training state, of the whole state
(``tree_sha256``). Loading verifies them: a flipped bit is a ``CheckpointError`` naming the
checkpoint instead of silently changed weights (or a resumed run whose loss becomes NaN). Any
error of orbax while restoring is reported as one ``CheckpointError`` naming the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging as py_logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import logging
from etils import epath

from drc_jax.core import errors, fileio, records
from drc_jax.core import schedule as schedule_lib
from drc_jax.models import unet as model_lib
from drc_jax.models import vq as vq_lib

MODEL_JSON = 'model.json'
# model.json's format of a Stable Diffusion workdir (targets/sd.py)
SD_FORMAT = 'drc_jax.stable_diffusion/1'
CHECKPOINT_DIR = 'checkpoints'
AUTOENCODER_DIR = 'autoencoder'
AUTOENCODER_JSON = 'config.json'
AUTOENCODER_WEIGHTS = 'weights.safetensors'
AUTOENCODER_FORMAT = 'drc_jax.vq_autoencoder/1'
# Keys of model.json's latent section, all required.
LATENT_KEYS = (
  'autoencoder',  # folder of the autoencoder, relative to the workdir
  'latent_shape',  # [h, w, c] the UNet runs on
  'image_shape',  # [H, W, C] the autoencoder decodes to
  'downsampling_factor',  # H / h
  'scaling_factor',  # the UNet sees scaling_factor * encode(x); decode takes z / scaling_factor
)
INTEGRITY_KEY = 'drc_jax_sha256'  # in a step's custom metadata: {'ema_params': hex, 'state': hex}
_STEP_METADATA = '_CHECKPOINT_METADATA'  # orbax's JSON file of a step (holds custom_metadata)


class CheckpointError(errors.UserError, ValueError):
  """A missing or mismatched checkpoint; the message names the path or key."""


def save_model_json(
  workdir,
  unet: model_lib.UNetConfig,
  diffusion: dict[str, Any],
  source: str = 'drc_jax',
  trained_on: dict[str, Any] | None = None,
  latent: dict[str, Any] | None = None,
) -> None:
  """Writes ``W/model.json``; ``trained_on`` (targets trained here) is ``splits.training_data``;
  ``latent`` (latent diffusion targets) holds ``LATENT_KEYS``."""
  doc = {'unet': unet.to_dict(), 'diffusion': dict(diffusion), 'source': source}
  if trained_on is not None:
    doc['trained_on'] = dict(trained_on)
  if latent is not None:
    doc['latent'] = dict(latent)
  fileio.atomic_write_text(epath.Path(workdir) / MODEL_JSON, json.dumps(doc, indent=1))


def read_model_doc(workdir) -> dict[str, Any]:
  """The parsed ``W/model.json``; a missing or unparsable file is a CheckpointError naming it."""
  path = epath.Path(workdir) / MODEL_JSON
  if not path.exists():
    raise CheckpointError(
      f'{path}: not found; {workdir} holds no drc_jax target (train one with '
      f'--mode=train or convert one with python -m drc_jax.convert)'
    )
  doc = records.read_json(
    path,
    CheckpointError,
    '; the target description is damaged: restore it or use another --workdir',
  )
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


def check_config_matches(workdir, config) -> None:
  """A target trained in ``workdir`` is trained further or audited only under the architecture and
  noise schedule it was trained with: a config that says otherwise is refused naming the first
  fields that differ (the audit would otherwise run the recorded model and record the config's).
  Imported targets and workdirs without a target are not checked.

  Raises:
    CheckpointError: naming ``config.<field>``, both values and ``model.json``.
  """
  path = epath.Path(workdir) / MODEL_JSON
  if not path.exists() or is_imported(workdir):
    return
  doc = read_model_doc(workdir)
  if doc.get('format') == SD_FORMAT:  # a text-conditioned target trained here
    diffs = _text_target_diffs(path, doc, config)
  elif config.get('text_model'):
    raise CheckpointError(
      f'{path}: the target in {workdir} is unconditional, but config.text_model asks for a '
      f'text-conditioned one; use another --workdir'
    )
  else:
    unet, diffusion = load_model_json(workdir)
    d = config.data
    want = model_lib.unet_config_from(config.model, d.resolution, d.channels).to_dict()
    have = unet.to_dict()
    field = {'resolution': 'data.resolution', 'in_channels': 'data.channels'}
    diffs = [
      (field.get(k, f'model.{k}'), want.get(k), have.get(k))
      for k in sorted(set(want) | set(have))
      if k not in ('dtype', 'dropout', 'out_channels') and want.get(k) != have.get(k)
    ]
    diffs += _diffusion_diffs(config, diffusion)
  if diffs:
    text = '; '.join(f'config.{f}: {w!r}, trained with {h!r}' for f, w, h in diffs[:3])
    raise CheckpointError(
      f'{path}: the target in {workdir} was trained with another architecture or schedule '
      f'({text}); set those fields as it was trained, or use another --workdir'
    )


def _diffusion_diffs(config, diffusion: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  return [
    (f'diffusion.{k}', config.diffusion[k], diffusion[k])
    for k in config.diffusion
    if k in diffusion and config.diffusion[k] != diffusion[k]
  ]


def _text_target_diffs(path: epath.Path, doc: dict, config) -> list[tuple[str, Any, Any]]:
  """(config field, config's value, recorded value) of a text-conditioned target trained here
  (``targets/train_text.py``: ``model.json`` records its ``text_model`` section)."""
  recorded, unet, diffusion = doc.get('text_model'), doc.get('unet'), doc.get('diffusion')
  if (
    not isinstance(recorded, dict) or not isinstance(unet, dict) or not isinstance(diffusion, dict)
  ):
    raise CheckpointError(f'{path}: a text-conditioned target without its text_model section')
  if not config.get('text_model'):
    raise CheckpointError(
      f'{path}: the target in {path.parent} is text-conditioned (trained with a '
      f'config.text_model section), the config has no text_model; use its config or another '
      f'--workdir'
    )
  want = json.loads(json.dumps(config.text_model.to_dict(), default=list))
  diffs = [
    (f'text_model.{k}', want.get(k), recorded.get(k))
    for k in sorted(set(want) | set(recorded))
    if want.get(k) != recorded.get(k)
  ]
  d = config.data
  diffs += [
    (f'data.{f}', v, unet.get(k))
    for f, v, k in (
      ('resolution', d.resolution, 'sample_size'),
      ('channels', d.channels, 'in_channels'),
    )
    if v != unet.get(k)
  ]
  return diffs + _diffusion_diffs(config, diffusion)


def trained_on(workdir) -> dict[str, Any] | None:
  """The training data a target trained here recorded (None: imported, or trained before
  drc_jax recorded it)."""
  doc = read_model_doc(workdir)
  value = doc.get('trained_on')
  return dict(value) if isinstance(value, dict) else None


def workdir_of(path) -> epath.Path:
  """The workdir of a target path: the workdir itself, its ``checkpoints/`` or one step in it."""
  path = epath.Path(path)
  if (path / MODEL_JSON).exists():
    return path
  if path.name == CHECKPOINT_DIR:
    return path.parent
  return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path


def is_imported(workdir) -> bool:
  """True when ``workdir`` holds a target converted from elsewhere (never trained here)."""
  path = epath.Path(workdir) / MODEL_JSON
  return path.exists() and read_model_doc(workdir).get('source', 'drc_jax') != 'drc_jax'


def latent_of(workdir) -> dict[str, Any] | None:
  """The ``latent`` section of ``W/model.json`` (None for a pixel-space target), checked."""
  path = epath.Path(workdir) / MODEL_JSON
  latent = read_model_doc(workdir).get('latent')
  if latent is None:
    return None
  if not isinstance(latent, dict) or set(LATENT_KEYS) - set(latent):
    found = sorted(latent) if isinstance(latent, dict) else type(latent).__name__
    raise CheckpointError(f'{path}: latent section needs keys {list(LATENT_KEYS)}, found {found}')
  try:
    h, w, _ = (int(v) for v in latent['latent_shape'])
    big_h, big_w, _ = (int(v) for v in latent['image_shape'])
    f = int(latent['downsampling_factor'])
    ok = (h * f, w * f) == (big_h, big_w) and float(latent['scaling_factor']) > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise CheckpointError(f'{path}: inconsistent latent section {latent}')
  return dict(latent)


def schedule_from(diffusion: dict[str, Any]) -> schedule_lib.NoiseSchedule:
  """The schedule of ``model.json``'s diffusion section (``beta_schedule`` defaults to linear)."""
  return schedule_lib.make_schedule(dict({'beta_schedule': 'linear'}, **diffusion))


def _absolute(path) -> epath.Path:
  """Orbax needs absolute paths: local relative paths are made absolute (gs:// stay as they are)."""
  p = epath.Path(path)
  return p if '://' in str(path) else epath.Path(p.absolute())


def manager(workdir, keep: int = 3) -> ocp.CheckpointManager:
  path = _absolute(workdir) / CHECKPOINT_DIR
  return ocp.CheckpointManager(
    path,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False
    ),
  )


def describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  shape = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
  parts = []
  if missing:
    parts.append(f'missing keys {missing[:5]}')
  if extra:
    parts.append(f'unexpected keys {extra[:5]}')
  if shape:
    parts.append(
      'shape mismatch '
      + ', '.join(f'{k}: checkpoint {found[k]} vs model {expected[k]}' for k in shape[:5])
    )
  return '; '.join(parts)


def _host(leaf) -> np.ndarray:
  """A leaf as a host array (a replicated multi-host array: this process's copy)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.asarray(leaf)


def tree_sha256(tree) -> str:
  """SHA-256 (hex) of a pytree of arrays: each leaf's dotted name, dtype, shape and bytes.

  Leaves are taken in sorted name order, so the hash depends on the values and names alone (not on
  the container types or the device the arrays live on).
  """
  h = hashlib.sha256()
  for name, leaf in sorted(model_lib.flat_params(tree).items()):
    a = np.ascontiguousarray(_host(leaf))
    h.update(f'{name}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _recorded(step_dir) -> dict[str, str] | None:
  """The hashes a step recorded when it was saved (None: saved before drc_jax recorded them)."""
  path = _absolute(step_dir) / _STEP_METADATA
  if not path.exists():
    return None
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{step_dir}: damaged checkpoint metadata {path.name} ({e})') from e
  custom = meta.get('custom_metadata') if isinstance(meta, dict) else None
  recorded = custom.get(INTEGRITY_KEY) if isinstance(custom, dict) else None
  return recorded if isinstance(recorded, dict) else None


def verify(step_dir, part: str, tree) -> str:
  """Checks ``tree`` (``part``: 'ema_params' or 'state') against the hash recorded at save time.

  Returns:
    The SHA-256 of ``tree``.

  Raises:
    CheckpointError: naming the checkpoint when the hashes differ.
  """
  got = tree_sha256(tree)
  recorded = _recorded(step_dir)
  if recorded is None or part not in recorded:
    logging.warning(
      '%s: no SHA-256 of %s recorded (saved by an older drc_jax): integrity not checked',
      step_dir,
      part,
    )
  elif recorded[part] != got:
    what = 'EMA weights' if part == 'ema_params' else 'training state'
    raise CheckpointError(
      f'{step_dir}: the {what} read back differ from those saved (SHA-256 '
      f'recorded {recorded[part][:12]}..., read {got[:12]}...): the '
      f'checkpoint is corrupt; restore it from a copy or delete this step'
    )
  return got


def save_state(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves a training state at ``step`` with the SHA-256 of its EMA weights and of itself."""
  hashes = {'ema_params': tree_sha256(state['ema_params']), 'state': tree_sha256(state)}
  mngr.save(step, args=ocp.args.StandardSave(state), custom_metadata={INTEGRITY_KEY: hashes})


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores the full training state at ``step`` (default: latest) into ``abstract_state``.

  Raises:
    CheckpointError: naming the checkpoint when it does not match the state, cannot be read, or
      differs from what was saved.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{mngr.directory}: no checkpoint found')
  step_dir = epath.Path(mngr.directory) / str(step)
  try:
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    raise _unreadable(
      step_dir, e, 'checkpoint does not match the training state of this config or cannot be read'
    ) from e
  except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax raise many kinds)
    raise _unreadable(step_dir, e) from e
  verify(step_dir, 'state', state)
  return state


def _first_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:300]}'


class _DropUnretrievedReadErrors(py_logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' reports of orbax array reads.

  When one array of a checkpoint cannot be read, orbax's other concurrent reads fail too; the
  first failure becomes our CheckpointError and asyncio would print every other one as its own
  traceback (dozens, interleaved) when the tasks are collected. They say nothing new.
  """

  def filter(self, record) -> bool:
    if 'exception was never retrieved' not in record.getMessage() or not record.exc_info:
      return True
    tb = record.exc_info[2]
    while tb is not None:
      if '/orbax/checkpoint/' in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return True


_DROP_UNRETRIEVED = _DropUnretrievedReadErrors()


def _unreadable(step_dir, e: BaseException, what: str = 'unreadable checkpoint') -> CheckpointError:
  py_logging.getLogger('asyncio').addFilter(_DROP_UNRETRIEVED)  # once: filters are a set
  return CheckpointError(f'{step_dir}: {what} ({_first_line(e)})')


def restore_ema(step_dir, abstract_params):
  """Reads only ``ema_params`` of a checkpoint step (a training state or a converted model).

  The stored names and shapes are checked against the model first: a mismatch names the keys.
  The weights are checked against the SHA-256 recorded when the step was saved; any read error is
  one CheckpointError naming the step.
  """
  item_dir = _absolute(step_dir) / 'default'
  handler = ocp.PyTreeCheckpointHandler()  # the item alone: no step metadata to look for
  try:
    tree = handler.metadata(item_dir).tree
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(step_dir, e) from e
  if 'ema_params' not in tree:
    raise CheckpointError(f'{item_dir}: no ema_params in checkpoint (found {sorted(tree)})')
  found = model_lib.flat_param_shapes(tree['ema_params'])
  detail = describe_mismatch(model_lib.flat_param_shapes(abstract_params), found)
  if detail:
    raise CheckpointError(
      f'{item_dir}: checkpoint does not match the model in model.json: {detail}'
    )
  item = {'ema_params': abstract_params}
  # Restored as host arrays: no device shardings to give (and no warning about them).
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    restored = handler.restore(
      item_dir, args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    )
  except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax raise many kinds)
    raise _unreadable(step_dir, e) from e
  verify(step_dir, 'ema_params', restored['ema_params'])
  return restored['ema_params']


def save_params_only(workdir, params, step: int = 0) -> None:
  """Writes a checkpoint holding only EMA weights (converted models): {'ema_params': params}."""
  mngr = manager(workdir, keep=1)
  mngr.save(
    step,
    args=ocp.args.StandardSave({'ema_params': params}),
    force=True,
    custom_metadata={INTEGRITY_KEY: {'ema_params': tree_sha256(params)}},
  )
  mngr.wait_until_finished()
  mngr.close()


# ----------------------------------------------------------------------------- autoencoder


def save_autoencoder(directory, cfg: vq_lib.VQConfig, params, source: str) -> None:
  """Writes a VQ autoencoder: ``weights.safetensors`` first, then ``config.json`` with its hash."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  flat = {k: np.ascontiguousarray(_host(v)) for k, v in model_lib.flat_params(params).items()}
  data = safetensors.numpy.save(flat)
  fileio.atomic_write_bytes(directory / AUTOENCODER_WEIGHTS, data)
  doc = {
    'format': AUTOENCODER_FORMAT,
    'kind': 'vq',
    'config': cfg.to_dict(),
    'source': source,
    'sha256': {AUTOENCODER_WEIGHTS: hashlib.sha256(data).hexdigest()},
  }
  fileio.atomic_write_text(directory / AUTOENCODER_JSON, json.dumps(doc, indent=1))


def load_autoencoder(directory) -> tuple[vq_lib.Autoencoder, Any]:
  """The VQ autoencoder of a latent target: (model, params as numpy arrays), all checked.

  Raises:
    CheckpointError: naming the file when the description is missing or damaged, the weights
      differ from the recorded SHA-256, or their names and shapes do not match the config.
  """

  directory = epath.Path(directory)
  path = directory / AUTOENCODER_JSON
  if not path.exists():
    raise CheckpointError(f'{path}: not found (the autoencoder of a latent diffusion target)')
  try:
    doc = json.loads(path.read_text())
    if doc.get('format') != AUTOENCODER_FORMAT:
      raise ValueError(f'format {doc.get("format")!r}, expected {AUTOENCODER_FORMAT!r}')
    cfg = vq_lib.VQConfig.from_dict(doc['config'])
    want = doc['sha256'][AUTOENCODER_WEIGHTS]
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
    raise CheckpointError(f'{path}: invalid autoencoder description ({e!r})') from e
  except ValueError as e:
    raise CheckpointError(f'{path}: invalid autoencoder description ({e})') from e
  weights = directory / AUTOENCODER_WEIGHTS
  if not weights.exists():
    raise CheckpointError(f'{weights}: not found (recorded in {path})')
  data = weights.read_bytes()
  got = hashlib.sha256(data).hexdigest()
  if got != want:
    raise CheckpointError(
      f'{weights}: SHA-256 {got[:12]}... differs from the {want[:12]}... recorded in {path}: '
      f'the file is corrupt; convert the target again'
    )
  try:
    flat = safetensors.numpy.load(data)
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own errors)
    raise CheckpointError(f'{weights}: unreadable safetensors file ({e})') from e
  model, abstract = vq_lib.abstract_autoencoder(cfg)
  found = {k: tuple(v.shape) for k, v in flat.items()}
  detail = describe_mismatch(model_lib.flat_param_shapes(abstract), found)
  if detail:
    raise CheckpointError(f'{weights}: weights do not match the autoencoder in {path}: {detail}')
  return model, model_lib.unflatten_params(abstract, flat)
