"""The suspect sets of ``--mode=dataset``: where each keeps its files, the checks a set passes
before any file moves, ``--overwrite`` of one set, and every set's result read back.

A workdir holds any number of suspect sets, each under its name (``validate.dataset_name``: the
folder's name, ``members-<size>`` / ``nonmembers-<size>``, or ``config.dataset.name``):

* ``W/dataset/suspects/<name>/set.json``: what the set is (its images: a folder's path, count and
  SHA-256, or a draw; its reference; the test's settings; the scores' fingerprint), written once
  every check has passed, before the set is scored;
* ``W/dataset/suspects/<name>/scores/``: a folder set's score shards (resumable);
* ``W/dataset/suspects/<name>/evidence.npz``: DRC's panels of its strongest suspects;
* ``W/dataset/suspects/<name>/dataset.json``: its result, written last.

A reference folder's scores are shared by every set: ``W/dataset/reference/`` (its
``folder_config.json`` and ``scores/``). A workdir of an earlier drc_jax held one set,
``W/dataset.json`` (its folder's scores in ``W/dataset/suspect/``); it is read as one set named
after its suspect source.

A run of a set whose name is taken by a set of other inputs is refused; with ``--overwrite`` that
set alone (its folder, or the earlier single set) moves to ``W/superseded/<time>/``, and nothing of
any other set moves. Every image of a new folder is read and checked (``open_folder``) before
that.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from drc_jax.audit import combiners, store
from drc_jax.core import errors, fileio, records
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib

DATASET_DIR = 'dataset'
SUSPECTS_DIR = 'suspects'
REFERENCE_DIR = 'reference'
LEGACY_SUSPECT_DIR = 'suspect'  # an earlier drc_jax's one suspect folder's scores
SET_JSON = 'set.json'
RESULT_JSON = store.DATASET_JSON
EVIDENCE_NPZ = 'evidence.npz'
FOLDER_CONFIG = 'folder_config.json'
EVIDENCE_ARRAYS = ('original', 'degraded', 'restored', 'restorations')
_HASH_BATCH = 1024
_REDO = "; rerun --mode=dataset with this set's config to compute it again"


def set_dir(workdir: str, name: str) -> epath.Path:
  return epath.Path(workdir) / DATASET_DIR / SUSPECTS_DIR / name


def reference_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / DATASET_DIR / REFERENCE_DIR


# ----------------------------------------------------------------------------------------------
# Folders, read and checked before anything moves.


@dataclasses.dataclass(frozen=True)
class Folder:
  """An image folder of ``--mode=dataset`` whose every image was read and checked.

  Attributes:
    role: 'suspect' or 'reference'.
    path: the folder, absolute.
    source: its images in sorted file order, each read once per run.
    files: the files' paths relative to the folder, in row order.
    hashes: str [N], SHA-256 of each image, in row order.
    sha256: of the whole folder (``splits.set_hash`` of ``hashes``).
  """

  role: str
  path: str
  source: Any
  files: tuple[str, ...]
  hashes: np.ndarray
  sha256: str

  def __len__(self) -> int:
    return len(self.files)

  def record(self, fingerprint: dict) -> dict:
    """What the folder's scores depend on (``folder_config.json``)."""
    return {
      'scores': fingerprint,
      'folder': self.path,
      'num_images': len(self),
      'sha256': self.sha256,
    }


def open_folder(config, role: str, path: str) -> Folder:
  """Reads and checks every image of ``config.dataset.<role>_dir``: decodable, one kind across the
  folder, the target's channels (unless ``config.data.convert_channels``), and at least 2 images
  for a reference. Changes no file.

  Raises:
    DataError: naming the folder or the file refused.
  """
  folder = data_lib.FolderSource(path, config.data.resolution, f'config.dataset.{role}_dir')
  if role == 'reference' and len(folder) < 2:
    raise data_lib.DataError(
      f'{path}: {len(folder)} image; config.dataset.reference_dir needs at least 2 (part of the '
      f'reference fits the combiner, the rest is tested against)'
    )
  source = data_lib.CachedSource(folder)  # scoring and the panels read them again from memory
  hashes = []
  for lo in range(0, len(folder), _HASH_BATCH):
    raw, _ = source.read(np.arange(lo, min(lo + _HASH_BATCH, len(folder))))
    hashes += data_lib.image_hashes(raw)
  d = config.data
  if folder.channels != d.channels and not d.convert_channels:
    raise data_lib.DataError(
      f'{path}: its images have {folder.channels} channel(s) but config.data.channels is '
      f'{d.channels} (set config.data.convert_channels=True to convert gray<->RGB)'
    )
  return Folder(
    role,
    os.path.abspath(path),
    source,
    tuple(os.path.relpath(f, path) for f in folder.files),
    np.asarray(hashes),
    splits_lib.set_hash(hashes),
  )


@dataclasses.dataclass(frozen=True)
class Images:
  """Scored images a suspect can come from: their score table, where the images are read, and
  what each row's attack keys derive from (its ``index`` plus ``key_offset``, as scored)."""

  table: dict[str, np.ndarray]
  source: Any
  key_offset: int
  files: tuple[str, ...] | None = None  # a folder's files by index (None: the dataset's images)


# ----------------------------------------------------------------------------------------------
# What a set is, and what an --overwrite of it moves.


def set_record(config, name: str, fingerprint: dict, suspect, reference) -> dict:
  """``set.json`` of set ``name``: its images, its reference, the test's settings, the scores.

  Args:
    config: the run's config (``config.dataset``).
    name: the set's name.
    fingerprint: ``store.fingerprint`` of the scores.
    suspect: the suspect ``Folder``, or None for a set drawn from the split.
    reference: the reference ``Folder``, or None for the split's non-members.
  """
  ds = config.dataset
  if suspect is not None:
    images = {'folder': suspect.path, 'num_images': len(suspect), 'sha256': suspect.sha256}
  else:
    images = {'draw': ds.suspect, 'size': int(ds.size)}
  if reference is not None:
    ref = {'folder': reference.path, 'num_images': len(reference), 'sha256': reference.sha256}
  else:
    ref = {'split': "the split's non-members"}
  record = {
    'name': name,
    'suspect': images,
    'reference': ref,
    'alpha': float(ds.alpha),
    'combiner': ds.combiner,
    'seed': int(ds.seed),
    'power_sizes': [int(n) for n in ds.power_sizes],
    'power_repetitions': int(ds.power_repetitions),
    'scores': fingerprint,
  }
  return json.loads(json.dumps(record))


def legacy_name(result: dict) -> str:
  """The name an earlier drc_jax's one set (``W/dataset.json``) is read under: its folder's name,
  or ``members-<size>`` / ``nonmembers-<size>``."""
  cfg = result.get('config') or {}
  if cfg.get('suspect_dir'):
    return os.path.basename(os.path.normpath(cfg['suspect_dir']))
  if cfg.get('suspect'):
    return f'{cfg["suspect"]}-{cfg.get("size", (result.get("suspect") or {}).get("n"))}'
  source = str((result.get('suspect') or {}).get('source', ''))
  if source.startswith('folder '):
    return os.path.basename(os.path.normpath(source[len('folder ') :]))
  return 'dataset'


def _legacy(workdir: str) -> dict | None:
  path = epath.Path(workdir) / RESULT_JSON
  if not path.exists():
    return None
  return records.read_json(path, errors.WorkdirError, _REDO)


def set_changes(workdir: str, record: dict) -> tuple[list[str], list[epath.Path]]:
  """How the set named ``record['name']`` in ``workdir`` differs from ``record``, and what an
  ``--overwrite`` moves aside: its folder, or an earlier drc_jax's one set of that name (its
  ``W/dataset.json`` and ``W/dataset/suspect/``). ([], []): no such set, or the same one."""
  name, wd = record['name'], epath.Path(workdir)
  changes: list[str] = []
  paths: list[epath.Path] = []
  root = set_dir(workdir, name)
  if root.exists():
    try:
      old = records.read_json(root / SET_JSON, errors.WorkdirError)
      # A set of an earlier drc_jax (no 'combiner') was combined with member labels.
      changes += store.diff({'combiner': combiners.MEMBER_LABELS, **old}, record)
    except errors.WorkdirError as e:
      changes.append(f'{e} (unknown inputs)')
    if changes:
      paths.append(root)
  legacy = _legacy(workdir)
  if legacy is not None and legacy_name(legacy) == name:
    changes.append(f'{wd / RESULT_JSON}: the one set of an earlier drc_jax')
    paths.append(wd / RESULT_JSON)
    if (wd / DATASET_DIR / LEGACY_SUSPECT_DIR).exists():
      paths.append(wd / DATASET_DIR / LEGACY_SUSPECT_DIR)
  return changes, paths


def reference_changes(workdir: str, record: dict) -> tuple[list[str], list[epath.Path]]:
  """How the reference scores in ``W/dataset/reference`` differ from a reference folder's
  ``record``, and what an ``--overwrite`` moves aside. ([], []): none there, or the same."""
  root = reference_dir(workdir)
  if not root.exists():
    return [], []
  try:
    changes = store.diff(records.read_json(root / FOLDER_CONFIG, errors.WorkdirError), record)
  except errors.WorkdirError as e:
    changes = [f'{e} (unknown inputs)']
  return changes, ([root] if changes else [])


def move_aside(workdir: str, paths: list[epath.Path]) -> epath.Path:
  """Moves ``paths`` (inside ``workdir``) to one new ``W/superseded/<time>/``, each at its place
  relative to the workdir; returns that folder."""
  dest = store.superseded_dir(workdir)
  for path in paths:
    fileio.move(path, dest / path.relative_to(epath.Path(workdir)))
  return dest


# ----------------------------------------------------------------------------------------------
# Evidence panels of the strongest suspects, and every set's result read back.


def save_evidence(root: epath.Path, items: list[dict]) -> None:
  """Writes the images of evidence items (``EVIDENCE_ARRAYS``) to ``root/evidence.npz``; the
  set's ``dataset.json`` keeps the rest of each item."""
  arrays = {
    f'{i}/{k}': np.asarray(item[k]) for i, item in enumerate(items) for k in EVIDENCE_ARRAYS
  }
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fileio.atomic_write_bytes(root / EVIDENCE_NPZ, buf.getvalue())


def _load_evidence(root: epath.Path, items: list[dict]) -> list[dict]:
  if not items:
    return []
  path = root / EVIDENCE_NPZ
  try:
    with path.open('rb') as f:
      z = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
    return [{**item, **{k: z[f'{i}/{k}'] for k in EVIDENCE_ARRAYS}} for i, item in enumerate(items)]
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise errors.WorkdirError(f'{path}: unreadable ({type(e).__name__}: {e}){_REDO}') from e


def read_results(workdir: str, fingerprint: dict | None) -> list[dict]:
  """Every suspect set's result in ``workdir`` computed from scores of ``fingerprint``, sorted by
  name, each with its ``name`` and its ``evidence`` items (their images loaded); a set of other
  scores is left out with a warning. An earlier drc_jax's ``W/dataset.json`` is one set, named by
  ``legacy_name``.

  Raises:
    WorkdirError: a result or its evidence cannot be read (naming the file).
  """
  found: dict[str, tuple[dict, epath.Path | None]] = {}  # name -> (result, its set's folder)
  legacy = _legacy(workdir)
  if legacy is not None:
    found[legacy_name(legacy)] = (dict(legacy, evidence=[]), None)
  root = epath.Path(workdir) / DATASET_DIR / SUSPECTS_DIR
  for d in sorted(root.iterdir()) if root.exists() else ():
    if (d / RESULT_JSON).exists():
      found[d.name] = (records.read_json(d / RESULT_JSON, errors.WorkdirError, _REDO), d)
  out = []
  for name in sorted(found):
    result, d = found[name]
    if result.get('fingerprint') != fingerprint:
      logging.warning('suspect set %s was computed from scores of another audit: not shown', name)
      continue
    evidence = _load_evidence(d, result.get('evidence') or []) if d is not None else []
    out.append(dict(result, name=name, evidence=evidence))
  return out
