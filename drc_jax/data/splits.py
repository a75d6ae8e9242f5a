"""Membership split manifests: which images of a dataset split are members and which are not.

A manifest holds index lists into one named dataset split, the seed that made it, the counts and
a SHA-256 over the raw image bytes of each set (so a changed dataset is noticed). It is stored as
JSON (``split.json`` in the workdir) and reads/writes the SecMI/PIA ``.npz`` format
(``mia_train_idxs`` = members, ``mia_eval_idxs`` = non-members), so results are comparable with
published ones. A split can also be two image folders (``config.split.members_dir`` and
``nonmembers_dir``: every image of each, members first; ``run_source`` makes their source) or be
drawn by class (``member_classes`` / ``nonmember_classes``: a class-shifted split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
from etils import epath

from drc_jax.core import fileio
from drc_jax.data import sources as data_lib


def _as_indices(values, name: str) -> np.ndarray:
  """int64 [N] from a list or array of whole numbers; anything else is a DataError."""
  try:
    arr = np.asarray(values).reshape(-1)
  except (TypeError, ValueError) as e:
    raise data_lib.DataError(f'split: {name} are not a list of indices ({e})') from e
  if arr.size == 0 or np.issubdtype(arr.dtype, np.integer):
    return arr.astype(np.int64)
  if arr.dtype.kind == 'f':
    bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
    if bad.size:
      raise data_lib.DataError(
        f'split: {name} index {bad[0].item()!r} is not a whole number (indices are never rounded)'
      )
    return arr.astype(np.int64)
  raise data_lib.DataError(f'split: {name} indices have type {arr.dtype} (expected integers)')


@dataclasses.dataclass
class SplitManifest:
  dataset: str  # source name, e.g. 'fashion_mnist/train' or 'cifar10/train'
  members: np.ndarray  # int64 indices into the dataset split
  nonmembers: np.ndarray  # int64 indices into the dataset split
  seed: int | None = None  # seed of the permutation (None when read from a .npz)
  members_sha256: str = ''  # SHA-256 over the per-image SHA-256s of the members, in order
  nonmembers_sha256: str = ''
  # Where the sets were drawn from (``config.split.member_range`` etc.; '' = anywhere).
  ranges: str = ''
  # The labels the sets were drawn from ('0,1,2|3,4': ``config.split.member_classes`` and
  # ``nonmember_classes``; '' = any class).
  classes: str = ''
  # Per-image SHA-256s of the members, filled in by ``resolve`` (not stored in the manifest).
  member_image_hashes: list[str] | None = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    self.members = _as_indices(self.members, 'members')
    self.nonmembers = _as_indices(self.nonmembers, 'non-members')
    for name, idx in (('members', self.members), ('non-members', self.nonmembers)):
      if len(np.unique(idx)) != len(idx):
        raise data_lib.DataError(f'split: duplicate indices among {name}')
    both = np.intersect1d(self.members, self.nonmembers)
    if both.size:
      raise data_lib.DataError(f'split: index {int(both[0])} is both a member and a non-member')

  def check_range(self, n: int, where: str) -> None:
    for name, idx in (('members', self.members), ('non-members', self.nonmembers)):
      bad = idx[(idx < 0) | (idx >= n)]
      if bad.size:
        raise data_lib.DataError(
          f'{where}: {name} index {int(bad[0])} out of range for a dataset split of {n} images'
        )

  def to_json(self) -> dict:
    return {
      'dataset': self.dataset,
      'seed': self.seed,
      'num_members': len(self.members),
      'num_nonmembers': len(self.nonmembers),
      'members_sha256': self.members_sha256,
      'nonmembers_sha256': self.nonmembers_sha256,
      'members': self.members.tolist(),
      'nonmembers': self.nonmembers.tolist(),
      **({'ranges': self.ranges} if self.ranges else {}),
      **({'classes': self.classes} if self.classes else {}),
    }


def parse_range(text: str, n_total: int, field: str) -> range:
  """'a:b' -> range(a, b) within [0, n_total) (a public model's fixed training set)."""
  try:
    a, b = (int(v) for v in text.split(':'))
  except ValueError as e:
    raise data_lib.DataError(f"config.split.{field}: {text!r} is not 'start:stop'") from e
  if not 0 <= a < b <= n_total:
    raise data_lib.DataError(
      f'config.split.{field}: {text!r} is not within the {n_total} images of the dataset'
    )
  return range(a, b)


def parse_classes(text: str, field: str) -> tuple[int, ...]:
  """'0,1,2' -> (0, 1, 2): the label ids of ``config.split.<field>`` ('' -> ()), sorted."""
  try:
    ids = [int(v) for v in str(text).split(',') if v.strip()] if str(text).strip() else []
  except ValueError as e:
    raise data_lib.DataError(
      f"config.split.{field}: {text!r} is not a comma list of label ids (e.g. '0,1,2')"
    ) from e
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise data_lib.DataError(f'config.split.{field}: {text!r} has a negative or repeated label id')
  return tuple(sorted(ids))


def make_split(
  dataset: str,
  n_total: int,
  num_members: int,
  num_nonmembers: int,
  seed: int,
  member_range: str = '',
  nonmember_range: str = '',
  member_classes: str = '',
  nonmember_classes: str = '',
  labels: np.ndarray | None = None,
) -> SplitManifest:
  """Random disjoint member / non-member sets from a seeded permutation of ``range(n_total)``.

  With ``member_range`` and ``nonmember_range`` ('start:stop', both or neither) the sets are drawn
  (seeded) from those index ranges: a public target trained on a fixed part of the dataset (e.g.
  FFHQ's first 60,000 images) has its members there and its non-members only outside it. With
  ``member_classes`` and ``nonmember_classes`` ('0,1,2', both or neither, disjoint; ``labels``:
  the label of every image) members are drawn only from images of those labels and non-members
  from theirs: a class-shifted split, the control on which a blind baseline must fire.
  """
  if num_members < 1 or num_nonmembers < 1:
    raise data_lib.DataError('config.split: num_members and num_nonmembers must be >= 1')
  if bool(member_range) != bool(nonmember_range):
    raise data_lib.DataError('config.split: give both member_range and nonmember_range, or neither')
  if bool(member_classes) != bool(nonmember_classes):
    raise data_lib.DataError(
      'config.split: give both member_classes and nonmember_classes, or neither'
    )
  if not member_range and not member_classes:
    if num_members + num_nonmembers > n_total:
      raise data_lib.DataError(
        f'config.split: {num_members} members + {num_nonmembers} '
        f'non-members exceed the {n_total} images of {dataset}'
      )
    perm = np.random.default_rng(seed).permutation(n_total)
    return SplitManifest(
      dataset,
      np.sort(perm[:num_members]),
      np.sort(perm[num_members : num_members + num_nonmembers]),
      seed,
    )
  pool_m = pool_n = np.arange(n_total, dtype=np.int64)
  ranges = classes = ''
  what_m = what_n = f'of {dataset}'
  if member_range:
    rm = parse_range(member_range, n_total, 'member_range')
    rn = parse_range(nonmember_range, n_total, 'nonmember_range')
    if set(rm) & set(rn):
      raise data_lib.DataError('config.split: member_range and nonmember_range overlap')
    pool_m, pool_n = np.asarray(rm, np.int64), np.asarray(rn, np.int64)
    ranges, what_m, what_n = f'{member_range}|{nonmember_range}', 'of its range', 'of its range'
  if member_classes:
    cm = parse_classes(member_classes, 'member_classes')
    cn = parse_classes(nonmember_classes, 'nonmember_classes')
    if set(cm) & set(cn):
      raise data_lib.DataError(
        f'config.split: member_classes and nonmember_classes share label {min(set(cm) & set(cn))}'
      )
    labels = np.asarray(labels, np.int64).reshape(-1)
    if labels.shape != (n_total,):
      raise ValueError(f'make_split: {labels.shape[0]} labels for {n_total} images')
    present = set(np.unique(labels[labels >= 0]).tolist())
    if not present:
      raise data_lib.DataError(
        f'config.split.member_classes: {dataset} has no labels (every label is -1); a split '
        f'by class needs a labelled source'
      )
    for field, ids in (('member_classes', cm), ('nonmember_classes', cn)):
      unknown = sorted(set(ids) - present)
      if unknown:
        raise data_lib.DataError(
          f'config.split.{field}: no image of {dataset} has label {unknown[0]} '
          f'(its labels: {", ".join(map(str, sorted(present)))})'
        )
    pool_m = pool_m[np.isin(labels[pool_m], cm)]
    pool_n = pool_n[np.isin(labels[pool_n], cn)]
    classes = f'{",".join(map(str, cm))}|{",".join(map(str, cn))}'
    what_m = f'{what_m} with labels {",".join(map(str, cm))}'
    what_n = f'{what_n} with labels {",".join(map(str, cn))}'
  for count, pool, field, what in (
    (num_members, pool_m, 'num_members', what_m),
    (num_nonmembers, pool_n, 'num_nonmembers', what_n),
  ):
    if count > len(pool):
      raise data_lib.DataError(
        f'config.split.{field}: {count} exceeds the {len(pool)} images {what}'
      )
  rng = np.random.default_rng(seed)
  members = np.sort(rng.choice(pool_m, num_members, replace=False))
  nonmembers = np.sort(rng.choice(pool_n, num_nonmembers, replace=False))
  return SplitManifest(dataset, members, nonmembers, seed, ranges=ranges, classes=classes)


def set_hash(hashes: list[str]) -> str:
  return hashlib.sha256(''.join(hashes).encode()).hexdigest()


def save(manifest: SplitManifest, path: str) -> None:
  """Writes JSON (``.json``) or the SecMI/PIA ``.npz`` format (``.npz``), atomically."""
  if str(path).endswith('.npz'):
    buf = io.BytesIO()
    np.savez(buf, mia_train_idxs=manifest.members, mia_eval_idxs=manifest.nonmembers)
    fileio.atomic_write_bytes(path, buf.getvalue())
  else:
    fileio.atomic_write_text(path, json.dumps(manifest.to_json()))


def load(path: str, dataset: str = '') -> SplitManifest:
  """Reads a ``.json`` manifest or a SecMI/PIA ``.npz`` split file."""
  p = epath.Path(path)
  if not p.exists():
    raise data_lib.DataError(f'{path}: split file not found (config.split.file)')
  if str(path).endswith('.npz'):
    try:
      with p.open('rb') as f:
        z = np.load(f)
        missing = [k for k in ('mia_train_idxs', 'mia_eval_idxs') if k not in z.files]
        if missing:
          raise data_lib.DataError(
            f'{path}: missing key {missing[0]!r} (a SecMI/PIA split has '
            f"'mia_train_idxs' and 'mia_eval_idxs'; found {z.files})"
          )
        members, nonmembers = z['mia_train_idxs'], z['mia_eval_idxs']
    except data_lib.DataError:
      raise
    except (OSError, ValueError) as e:
      raise data_lib.DataError(f'{path}: not a readable .npz file ({e})') from e
    try:
      return SplitManifest(dataset, members, nonmembers)
    except data_lib.DataError as e:
      raise data_lib.DataError(f'{path}: {e}') from e
  try:
    d = json.loads(p.read_text())
    return SplitManifest(
      d['dataset'],
      d['members'],
      d['nonmembers'],
      d.get('seed'),
      d.get('members_sha256', ''),
      d.get('nonmembers_sha256', ''),
      d.get('ranges', ''),
      d.get('classes', ''),
    )
  except data_lib.DataError as e:
    raise data_lib.DataError(f'{path}: {e}') from e
  except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise data_lib.DataError(f'{path}: not a valid split manifest ({e!r})') from e


def _ranges(split_cfg) -> str:
  m, n = split_cfg.get('member_range', ''), split_cfg.get('nonmember_range', '')
  return f'{m}|{n}' if m or n else ''


def _classes(split_cfg) -> str:
  """The manifest's ``classes`` of a config: 'member ids|non-member ids' ('' = any class)."""
  m, n = split_cfg.get('member_classes', ''), split_cfg.get('nonmember_classes', '')
  if not m and not n:
    return ''
  ids = [parse_classes(v, f) for v, f in ((m, 'member_classes'), (n, 'nonmember_classes'))]
  return '|'.join(','.join(map(str, i)) for i in ids)


FOLDER_FIELDS = ('members_dir', 'nonmembers_dir')


def check_fields(split_cfg) -> None:
  """Refuses ``config.split`` fields that are incomplete or contradict each other (one line
  naming the fields): half of a folder pair or of a class pair, overlapping classes, a folder
  pair with a split file, ranges or classes, folders that are missing or overlap."""
  m, n = (split_cfg.get(f, '') for f in FOLDER_FIELDS)
  if bool(m) != bool(n):
    raise data_lib.DataError(
      'config.split.members_dir and config.split.nonmembers_dir: give both, or neither'
    )
  mc, nc = split_cfg.get('member_classes', ''), split_cfg.get('nonmember_classes', '')
  if bool(mc) != bool(nc):
    raise data_lib.DataError(
      'config.split.member_classes and config.split.nonmember_classes: give both, or neither'
    )
  shared = set(parse_classes(mc, 'member_classes')) & set(parse_classes(nc, 'nonmember_classes'))
  if shared:
    raise data_lib.DataError(
      f'config.split.member_classes and config.split.nonmember_classes: label {min(shared)} '
      f'is in both (the classes of members and non-members must be disjoint)'
    )
  if not m:
    return
  for field in ('file', 'member_range', 'nonmember_range', 'member_classes', 'nonmember_classes'):
    if split_cfg.get(field, ''):
      raise data_lib.DataError(
        f'config.split.{field} and config.split.members_dir: set one, not both (a split of '
        f'two folders audits every image of each; {field} does not apply)'
      )
  for field, path in zip(FOLDER_FIELDS, (m, n)):
    if not os.path.isdir(path):
      raise data_lib.DataError(f'config.split.{field}: {path} is not a directory')
  a, b = (os.path.realpath(p) for p in (m, n))
  if os.path.commonpath([a, b]) in (a, b):
    raise data_lib.DataError(
      f'config.split.members_dir and config.split.nonmembers_dir: {m} and {n} overlap (an '
      f'image would be both a member and a non-member)'
    )


def folders_name(split_cfg) -> str:
  """The dataset name of a split of two folders: both folders, absolute."""
  m, n = (os.path.abspath(split_cfg[f]) for f in FOLDER_FIELDS)
  return f'folders:members={m}|nonmembers={n}'


def run_source(config) -> data_lib.ImageSource:
  """The images a run audits: the members folder then the non-members folder
  (``config.split.members_dir`` / ``nonmembers_dir``, each in sorted file order) when they are
  set, else the source of ``config.data``."""
  check_fields(config.split)
  if not config.split.get('members_dir', ''):
    return data_lib.make_source(config.data)
  parts = [
    data_lib.FolderSource(config.split[f], config.data.resolution, f'config.split.{f}')
    for f in FOLDER_FIELDS
  ]
  return data_lib.ConcatSource(parts, folders_name(config.split))


def _folder_sizes(split_cfg, source) -> tuple[int, int] | None:
  """(members, non-members) of a split of two folders (None: no folders set)."""
  if not split_cfg.get('members_dir', ''):
    return None
  inner = source
  while isinstance(inner, data_lib.CachedSource):
    inner = inner.source
  if not isinstance(inner, data_lib.ConcatSource) or inner.name != folders_name(split_cfg):
    raise ValueError(f'{source.name}: not the source of config.split.members_dir (run_source)')
  return len(inner.parts[0]), len(inner.parts[1])


def _labels(source) -> np.ndarray:
  """The label of every image of ``source`` (read in chunks, around a run cache)."""
  while isinstance(source, data_lib.CachedSource):
    source = source.source
  step = 4096
  return np.concatenate(
    [np.zeros(0, np.int64)]
    + [source.read(range(lo, min(lo + step, len(source))))[1] for lo in range(0, len(source), step)]
  )


def resolve(
  split_cfg, source: data_lib.ImageSource, workdir: str, write: bool = True
) -> SplitManifest:
  """The split of a run: from ``split.file``, else ``workdir/split.json``, else made and written.

  A split made from the config must match one already in the workdir (same dataset, counts,
  seed, ranges and classes); image hashes are filled in when missing and checked when present.
  With ``members_dir`` / ``nonmembers_dir`` (``source`` from ``run_source``) the members are
  every image of the first folder and the non-members every image of the second.
  """
  check_fields(split_cfg)
  path = os.path.join(workdir, 'split.json')
  folders = _folder_sizes(split_cfg, source)
  if split_cfg.file:
    manifest = load(split_cfg.file, source.name)
    where = split_cfg.file
  elif epath.Path(path).exists():
    manifest = load(path)
    where = path
    counts = folders or (split_cfg.num_members, split_cfg.num_nonmembers)
    seed = None if folders else split_cfg.seed
    want = (source.name, *counts, seed, _ranges(split_cfg), _classes(split_cfg))
    have = (
      manifest.dataset,
      len(manifest.members),
      len(manifest.nonmembers),
      manifest.seed,
      manifest.ranges,
      manifest.classes,
    )
    if want != have:
      hint = (
        'the folders changed since; use another workdir'
        if folders
        else f'use another workdir or set config.split.file={path}'
      )
      raise data_lib.DataError(
        f'{path}: the workdir split (dataset, members, non-members, seed, ranges, classes) = '
        f'{have} differs from the config {want}; {hint}'
      )
  elif folders:
    n_m, n_n = folders
    manifest = SplitManifest(source.name, np.arange(n_m), np.arange(n_m, n_m + n_n))
    where = 'config.split.members_dir'
  else:
    classes = _classes(split_cfg)
    manifest = make_split(
      source.name,
      len(source),
      split_cfg.num_members,
      split_cfg.num_nonmembers,
      split_cfg.seed,
      split_cfg.get('member_range', ''),
      split_cfg.get('nonmember_range', ''),
      split_cfg.get('member_classes', ''),
      split_cfg.get('nonmember_classes', ''),
      _labels(source) if classes else None,
    )
    where = 'config.split'
  manifest.check_range(len(source), where)
  for name, idx in (('members', manifest.members), ('non-members', manifest.nonmembers)):
    if not idx.size:
      raise data_lib.DataError(f'{where}: no {name} (an audit needs both sets)')
  per_image = {
    name: data_lib.image_hashes(source.read(idx)[0])
    for name, idx in (('members', manifest.members), ('nonmembers', manifest.nonmembers))
  }
  manifest.member_image_hashes = per_image['members']
  hashes = {name: set_hash(h) for name, h in per_image.items()}
  for name, h in hashes.items():
    old = getattr(manifest, f'{name}_sha256')
    if old and old != h:
      raise data_lib.DataError(
        f'{where}: the {name} images changed since the split was made '
        f'(SHA-256 {old[:12]}... now {h[:12]}...)'
      )
    setattr(manifest, f'{name}_sha256', h)
  if write:
    write_to_workdir(manifest, workdir)
  return manifest


def write_to_workdir(manifest: SplitManifest, workdir: str) -> None:
  """Writes ``workdir/split.json`` unless the workdir has one (``resolve`` checked it)."""
  path = os.path.join(workdir, 'split.json')
  if not epath.Path(path).exists():
    save(manifest, path)


# ----------------------------------------------------------------------------------------------
# What a target was trained on (recorded in its model.json as 'trained_on').

# Fields that must agree for a target to be audited on (or trained further with) a split; the
# others ('source', 'name', 'split', 'data_dir'; for a split of two folders 'members_dir' and
# 'nonmembers_dir') are recorded to say where the data came from.
TRAINED_ON_CHECKED = (
  'dataset',
  'resolution',
  'channels',
  'center_crop',
  'convert_channels',
  'num_members',
  'member_indices_sha256',
  'member_images_sha256',
)


def training_data(config, source: data_lib.ImageSource, split: SplitManifest) -> dict:
  """The identity of a training set: where the images come from (``config.data``, or the two
  folders of ``config.split``), how they are prepared, and SHA-256s of the sorted member indices
  and of the sorted member image hashes (so neither the order of a split file nor a moved copy
  of the data changes it)."""
  if split.member_image_hashes is None:
    raise ValueError('training_data needs a manifest from splits.resolve')
  data_cfg = config.data
  if config.split.get('members_dir', ''):
    origin = {
      'source': 'folders',
      **{f: os.path.abspath(config.split[f]) for f in FOLDER_FIELDS},
    }
  else:
    origin = {
      'source': data_cfg.source,
      'name': data_cfg.name,
      'split': data_cfg.split,
      'data_dir': data_cfg.data_dir,
    }
  return {
    **origin,
    'dataset': source.name,
    'resolution': int(data_cfg.resolution),
    'channels': int(data_cfg.channels),
    'center_crop': int(data_cfg.center_crop),
    'convert_channels': bool(data_cfg.convert_channels),
    'num_members': int(len(split.members)),
    'member_indices_sha256': hashlib.sha256(
      np.sort(split.members).astype('<i8').tobytes()
    ).hexdigest(),
    'member_images_sha256': set_hash(sorted(split.member_image_hashes)),
  }


def check_trained_on(recorded: dict | None, current: dict, where: str) -> None:
  """Refuses a target trained on other data than ``current`` (``training_data`` of this run).

  Args:
    recorded: the target's ``trained_on`` (None: an imported target, or one trained before
      drc_jax recorded it; not checked).
    current: this run's training data identity.
    where: the model.json that recorded ``recorded``, for the message.

  Raises:
    data_lib.DataError: naming ``where`` and every field that differs.
  """
  if recorded is None:
    return
  diffs = [
    f'{k}: {recorded.get(k)!r} -> {current.get(k)!r}'
    for k in TRAINED_ON_CHECKED
    if recorded.get(k) != current.get(k)
  ]
  if diffs:
    raise data_lib.DataError(
      f"{where}: the target was trained on other data than this run's members "
      f'({"; ".join(d[:120] for d in diffs)}); audit it with the data and split it was '
      f"trained on (its workdir's split.json), or use another --workdir"
    )
