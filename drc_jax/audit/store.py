"""The score store of an audit workdir: score shards, the record of what they depend on, and the
refusal to mix results of different configs or targets.

Scores are written in shard files ``W/scores/shard_NNNNN.npz`` of ``audit.shard_size`` images
(members first, then non-members, in split order), each written atomically, so a run killed at
any moment leaves only whole shards; rerunning skips them and ends with the same scores as an
uninterrupted run. ``W/audit_config.json`` records what the scores depend on: the config fields
and the audited target's identity (checkpoint step and SHA-256 of its EMA weights). A workdir
holding results of another config or target is refused, unless ``overwrite``: then, once every
input (target, data source, split, training data) has been validated, the old results
(``audit_config.json``, ``scores/``, ``metrics.json``, ``report.html``, ``report/``) move together
to ``W/superseded/<time>/``; nothing is deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zipfile
import zlib

import jax
import numpy as np
from absl import logging
from etils import epath

from drc_jax.audit import samples as samples_lib
from drc_jax.audit import validate
from drc_jax.core import errors, fileio, parallel, records
from drc_jax.models import latent as latent_lib
from drc_jax.targets import checkpoints, encoders, shipped
from drc_jax.targets import load as target_lib

AUDIT_CONFIG = 'audit_config.json'
SCORES_DIR = 'scores'
DATASET_JSON = 'dataset.json'  # a suspect set's result, --mode=dataset (suspects.py)
SUPERSEDED_DIR = 'superseded'
# The results of one audit, in the order they move aside (the record of what they are, last).
RESULTS = (
  'report.html',
  'report',
  'metrics.json',
  'samples.json',
  samples_lib.SAMPLES_FILE,
  SCORES_DIR,
  AUDIT_CONFIG,
)


class AuditConfigMismatch(errors.WorkdirError):
  """The workdir holds scores of another config or target."""


# Fields added after workdirs were made: left out of the fingerprint at these values (which
# reproduce the earlier behaviour), so those workdirs still resume and report.
_LATER_DEFAULTS = {
  'drc': {
    'saliency': 'foreground',
    'saliency_encoder': '',
    'compare_encoder': '',
    'face_detector': '',
  },
  'split': {
    'member_range': '',
    'nonmember_range': '',
    'member_classes': '',
    'nonmember_classes': '',
    'members_dir': '',
    'nonmembers_dir': '',
  },
  'attacks': {'rediffuse_t': 200, 'rediffuse_k': 100, 'rediffuse_n': 10},
}


def without_later_defaults(section: str, values: dict) -> dict:
  """``values`` of a config section less the fields added later, where they hold the default."""
  later = _LATER_DEFAULTS.get(section, {})
  return {k: v for k, v in values.items() if later.get(k, object()) != v}


def encoder_digests(config) -> dict[str, str]:
  """SHA-256 of the weights of each encoder DRC uses (recorded in its ``encoder.json``)."""
  out = {}
  for role, field in validate.drc_encoder_fields(config).items():
    if config.drc[field].startswith(encoders.RANDOM_PREFIX):  # seeded: the name identifies it
      out[role] = config.drc[field]
      continue
    meta = json.loads((epath.Path(config.drc[field]) / encoders.ENCODER_JSON).read_text())
    out[role] = meta.get('sha256', {}).get(encoders.WEIGHTS, '')
  return out


def description_sha256(target) -> str:
  """SHA-256 of a loaded target's description: its UNet config, its noise schedule's betas and,
  for a latent target, the autoencoder config and latent section."""
  if getattr(target, 'is_text_conditioned', False):  # a Stable Diffusion-style target
    doc = {
      'unet': target.unet.config.to_dict(),
      'vae': None if target.vae is None else target.vae.config.to_dict(),
      'text_encoder': dataclasses.asdict(target.text_encoder.config),
      'tokenizer': target.tokenizer.tokenize(['a photo of a cat', '']).tolist(),
      'prediction_type': target.prediction_type,
      'scaling_factor': target.scaling_factor,
      'betas_sha256': hashlib.sha256(
        np.asarray(target.schedule.betas, np.float64).tobytes()
      ).hexdigest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()
  doc = {
    'unet': target.config.to_dict(),
    'betas_sha256': hashlib.sha256(
      np.asarray(target.schedule.betas, np.float64).tobytes()
    ).hexdigest(),
  }
  if target.is_latent:
    doc['autoencoder'] = target.autoencoder.config.to_dict()
    doc['latent'] = {k: v for k, v in target.latent.items() if k != 'autoencoder'}
  return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()


def audited_params(target):
  """The params an audit scores with (a latent target: ``{'unet', 'vq'}``), as NumPy arrays."""
  if getattr(target, 'is_text_conditioned', False):
    params = target.params  # {'unet', 'vae', 'text_encoder'}
  elif target.is_latent:
    params = latent_lib.from_target(target)[1]
  else:
    params = target.params
  return jax.tree_util.tree_map(np.asarray, params)


# SHA-256 of the files the audited target was loaded from, beside the scores (it moves aside with
# them): a redraw that finds the same files need not load the model to know it is the same.
TARGET_FILES = f'{SCORES_DIR}/target_files.json'


def files_sha256(paths) -> str:
  """One SHA-256 over files: each one's name (relative to the first's folder) and its own
  SHA-256 (``shipped.sha256_file``, read in chunks: checkpoints can be large)."""
  h = hashlib.sha256()
  paths = list(paths)
  root = epath.Path(paths[0]).parent if paths else None
  for p in paths:
    h.update(f'{os.path.relpath(str(p), str(root))}\0{shipped.sha256_file(p)}\0'.encode())
  return h.hexdigest()


def _target_path(recorded: dict, workdir) -> str:
  checkpoint = (recorded.get('audit') or {}).get('checkpoint', '')
  return shipped.resolve(checkpoint) if checkpoint else str(workdir)


def record_target_files(workdir, fp: dict) -> None:
  """Writes ``TARGET_FILES``: the digest of the audited target's files (none for a random one)."""
  files = target_lib.target_files(_target_path(fp, workdir))
  if not files:
    return
  doc = {'target': fp.get('target'), 'files_sha256': files_sha256(files)}
  path = epath.Path(workdir) / TARGET_FILES
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))


def _same_target_files(workdir, recorded: dict, path: str) -> bool:
  """Whether the target's files are those recorded when the scores were written."""
  record = epath.Path(workdir) / TARGET_FILES
  if not record.exists():
    return False
  try:
    doc = json.loads(record.read_text())
    files = target_lib.target_files(path)
  except (OSError, ValueError, errors.UserError):
    return False
  return (
    bool(files)
    and doc.get('target') == recorded.get('target')
    and doc.get('files_sha256') == files_sha256(files)
  )


def check_saved_results(workdir: str) -> dict:
  """The recorded fingerprint of ``workdir``'s results, after checking, without any config, that
  they still describe what is there: every score shard intact and of that fingerprint, and the
  audited target (the workdir's own or the one ``audit.checkpoint`` named) the one scored.

  Raises:
    WorkdirError: no audit results, or a shard of another fingerprint.
    DamagedShard: a damaged shard (named).
    AuditConfigMismatch: the target changed since its scores were written.
  """
  recorded = recorded_fingerprint(workdir)
  if recorded is None:
    raise errors.WorkdirError(
      f'{workdir} holds no audit results ({AUDIT_CONFIG} not found); run --mode=audit first'
    )
  load_scores(workdir, fingerprint_digest(recorded))
  path = _target_path(recorded, workdir)
  if _same_target_files(workdir, recorded, path):
    return recorded  # the very files the scores were computed from
  target = target_lib.load_target(path)
  now = {
    'step': target.step,
    'ema_sha256': checkpoints.tree_sha256(audited_params(target)),
    'description_sha256': description_sha256(target),
  }
  was = {k: (recorded.get('target') or {}).get(k) for k in now}
  changes = diff({'target': was}, {'target': now})
  if changes:
    raise AuditConfigMismatch(
      f'{workdir}: its saved scores are not those of this config and target '
      f'({"; ".join(changes)}); run --mode=audit --overwrite to score the target anew (the '
      f'old results move to {workdir}/{SUPERSEDED_DIR}/)'
    )
  return recorded


def fingerprint(config, target) -> dict:
  """What the per-image scores depend on: the config fields (not batch size, plots or bootstrap),
  the audited target (checkpoint step, SHA-256 of its EMA weights and of its description as
  loaded: architecture, schedule) and DRC's encoders."""
  c = config.to_dict()
  audit = {k: c['audit'][k] for k in ('shard_size', 'checkpoint', 'max_images')}
  # DRC's aggregation turns the saved similarities into scores after scoring (results.py): a
  # new rule re-reads the same shards
  drc = {k: v for k, v in without_later_defaults('drc', c['drc']).items() if k != 'aggregation'}
  identity = {
    'step': target.step,
    'ema_sha256': target.ema_sha256,
    'description_sha256': target.description_sha256,
  }
  # a text-conditioned run: the captions and guidance the scores were made under (training's
  # caption dropout plays no part)
  text = {}
  if c.get('text', {}).get('captions'):
    text = {'text': {k: v for k, v in c['text'].items() if k != 'caption_dropout'}}
  digests = encoder_digests(config)
  if digests:
    identity['encoders_sha256'] = digests
  return json.loads(
    json.dumps(
      {
        'seed': c['seed'],
        'data': c['data'],
        'split': without_later_defaults('split', c['split']),
        'diffusion': c['diffusion'],
        'model': c['model'],
        'drc': drc,
        'attacks': without_later_defaults('attacks', c['attacks']),
        'audit': audit,
        'target': identity,
        **text,
      },
      default=list,
    )
  )


def recorded_fingerprint(workdir) -> dict | None:
  """The fingerprint of the results in ``workdir`` (None: none recorded)."""
  path = epath.Path(workdir) / AUDIT_CONFIG
  if not path.exists():
    return None
  doc = records.read_json(
    path,
    errors.WorkdirError,
    '; move it away with the results it describes, or use another --workdir',
  )
  return doc


def diff(a, b, prefix='') -> list[str]:
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += diff(va, vb, f'{prefix}{k}.')
    elif va != vb:
      digest = k.endswith('sha256')
      short = lambda v, digest=digest: f'{v[:12]}...' if digest and isinstance(v, str) else repr(v)
      out.append(f'{prefix}{k}: {short(va)} -> {short(vb)}')
  return out


def _changes(workdir, fp: dict) -> list[str]:
  """How the results in ``workdir`` differ from ``fp`` (empty: none, or the same)."""
  old = recorded_fingerprint(workdir)
  if old is None:
    scores = epath.Path(workdir) / SCORES_DIR
    has_scores = scores.exists() and any(scores.glob('shard_*.npz'))
    return (
      [f'{SCORES_DIR}/ without {AUDIT_CONFIG}: unknown config and target'] if has_scores else []
    )
  if 'target' not in old:
    old = dict(old, target='not recorded (audited by an older drc_jax)')
  return diff(old, fp)


def check_scores_match(config, workdir: str, target) -> None:
  """Refuses to report scores of another config or target than ``config`` and ``target``."""
  if recorded_fingerprint(workdir) is None:
    raise errors.WorkdirError(
      f'{workdir} holds no audit results ({AUDIT_CONFIG} not found); run --mode=audit first'
    )
  changes = _changes(workdir, fingerprint(config, target))
  if changes:
    raise AuditConfigMismatch(
      f'the scores in {workdir} are not those of this config and target '
      f'({"; ".join(changes[:6])}); run --mode=audit (with --overwrite to '
      f'replace them)'
    )


def superseded_dir(workdir: str) -> epath.Path:
  """A new, empty ``W/superseded/<time>[-n]/`` for results moved aside."""
  root = epath.Path(workdir) / SUPERSEDED_DIR
  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  dst, n = root / stamp, 1
  while dst.exists():
    dst, n = root / f'{stamp}-{n}', n + 1
  dst.mkdir(parents=True)
  return dst


def _move_aside(workdir: str) -> epath.Path:
  """Moves every result file of ``workdir`` into a new ``W/superseded/<time>/``; returns it."""
  dst = superseded_dir(workdir)
  for name in RESULTS:
    src = epath.Path(workdir) / name
    if src.exists():
      fileio.move(src, dst / name)
  return dst


def check_workdir(config, workdir: str, overwrite: bool, target) -> None:
  """Refuses a workdir holding results of another config or target, unless ``overwrite``: then
  moves them to ``W/superseded/<time>/``. Records this run's fingerprint.

  Call it only once every input has been validated: it is the first step that changes files.
  """
  fp = fingerprint(config, target)
  changes = _changes(workdir, fp)
  if changes and not overwrite:
    raise AuditConfigMismatch(
      f'{workdir} holds results of a different config or target ({"; ".join(changes[:6])}). '
      f'Use another --workdir, or pass --overwrite to move those results to '
      f'{workdir}/{SUPERSEDED_DIR}/ and audit anew.'
    )
  parallel.sync('audit_config_checked')  # every process has read the old record
  if parallel.is_writer():
    if changes:
      dst = _move_aside(workdir)
      logging.warning(
        '--overwrite: the results in %s moved to %s (%s)', workdir, dst, '; '.join(changes)
      )
    fileio.atomic_write_text(
      epath.Path(workdir) / AUDIT_CONFIG, json.dumps(fp, indent=1, sort_keys=True)
    )
    record_target_files(workdir, fp)
  parallel.sync('audit_config_written')


def shard_path(workdir, i: int) -> epath.Path:
  return epath.Path(workdir) / SCORES_DIR / f'shard_{i:05d}.npz'


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fileio.atomic_write_bytes(path, buf.getvalue())


def read_npz(path) -> dict[str, np.ndarray]:
  with epath.Path(path).open('rb') as f:
    z = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return {k: z[k] for k in z.files}


# A score shard carries the SHA-256 of its own arrays and the digest of the fingerprint it was
# scored under: a damaged shard is found (and rescored), a shard of another config never counts.
SHARD_SHA256 = '_sha256'
SHARD_FINGERPRINT = '_fingerprint'


class DamagedShard(errors.WorkdirError):
  """A score shard that cannot be read or whose arrays differ from its recorded SHA-256."""


def fingerprint_digest(fp: dict) -> str:
  """SHA-256 of a fingerprint (``fingerprint(config, target)``), as shards record it."""
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(arrays):
    a = np.ascontiguousarray(arrays[k])
    h.update(f'{k}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def write_shard(path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
  """Writes a score shard atomically with its fingerprint digest and checksum."""
  arrays = {**arrays, SHARD_FINGERPRINT: np.asarray(fingerprint)}
  write_npz(path, {**arrays, SHARD_SHA256: np.asarray(_arrays_sha256(arrays))})


def read_shard(path) -> tuple[dict[str, np.ndarray], str | None]:
  """(the shard's score arrays, the fingerprint digest it records; None for a shard written
  before shards recorded one).

  Raises:
    DamagedShard: the file is truncated, corrupt or changed (naming it).
  """
  try:
    arrays = read_npz(path)
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise DamagedShard(f'{path}: damaged score shard ({type(e).__name__}: {e})') from e
  want = arrays.pop(SHARD_SHA256, None)
  if want is not None and str(want) != _arrays_sha256(arrays):
    raise DamagedShard(f'{path}: damaged score shard (its arrays differ from their SHA-256)')
  fingerprint = arrays.pop(SHARD_FINGERPRINT, None)
  return arrays, None if fingerprint is None else str(fingerprint)


def shard_problem(path, fingerprint: str) -> str | None:
  """Why shard ``path`` does not count as done under ``fingerprint`` (None: it does)."""
  try:
    _, recorded = read_shard(path)
  except DamagedShard as e:
    return str(e)
  if recorded is not None and recorded != fingerprint:
    return f'{path}: scored under another config or target (fingerprint {recorded[:12]}...)'
  return None


def load_scores(workdir: str, fingerprint: str | None = None) -> dict[str, np.ndarray]:
  """Concatenates every score shard into one table (rows in audit order).

  Raises:
    DamagedShard: a shard cannot be read or was changed (naming it).
    WorkdirError: shards are missing, or one was scored under another ``fingerprint``.
  """
  files = sorted((epath.Path(workdir) / SCORES_DIR).glob('shard_*.npz'))
  if not files:
    raise errors.WorkdirError(
      f'{epath.Path(workdir) / SCORES_DIR}: no score shards; run --mode=audit first'
    )
  parts = []
  for f in files:
    try:
      arrays, recorded = read_shard(f)
    except DamagedShard as e:
      raise DamagedShard(f'{e}; rerun --mode=audit to score it again') from e
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
      raise errors.WorkdirError(
        f'{f}: scored under another config or target; rerun --mode=audit to score it again'
      )
    parts.append(arrays)
  numbers = [int(f.name[6:11]) for f in files]
  if numbers != list(range(len(files))):
    raise errors.WorkdirError(
      f'{workdir}/{SCORES_DIR}: shards missing among {numbers}; rerun the audit'
    )
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
