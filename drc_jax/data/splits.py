"""Membership split manifests: which images of a dataset split are members and which are not.

A manifest holds index lists into one named dataset split, the seed that made it, the counts and
a SHA-256 over the raw image bytes of each set (so a changed dataset is noticed). It is stored as
JSON (``split.json`` in the workdir) and reads/writes the SecMI/PIA ``.npz`` format
(``mia_train_idxs`` = members, ``mia_eval_idxs`` = non-members), so results are comparable with
published ones.
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


def make_split(
  dataset: str,
  n_total: int,
  num_members: int,
  num_nonmembers: int,
  seed: int,
  member_range: str = '',
  nonmember_range: str = '',
) -> SplitManifest:
  """Random disjoint member / non-member sets from a seeded permutation of ``range(n_total)``.

  With ``member_range`` and ``nonmember_range`` ('start:stop', both or neither) the sets are drawn
  (seeded) from those index ranges: a public target trained on a fixed part of the dataset (e.g.
  FFHQ's first 60,000 images) has its members there and its non-members only outside it.
  """
  if num_members < 1 or num_nonmembers < 1:
    raise data_lib.DataError('config.split: num_members and num_nonmembers must be >= 1')
  if bool(member_range) != bool(nonmember_range):
    raise data_lib.DataError('config.split: give both member_range and nonmember_range, or neither')
  if member_range:
    rm = parse_range(member_range, n_total, 'member_range')
    rn = parse_range(nonmember_range, n_total, 'nonmember_range')
    if set(rm) & set(rn):
      raise data_lib.DataError('config.split: member_range and nonmember_range overlap')
    for count, r, field in (
      (num_members, rm, 'num_members'),
      (num_nonmembers, rn, 'num_nonmembers'),
    ):
      if count > len(r):
        raise data_lib.DataError(f'config.split.{field}: {count} exceeds its range of {len(r)}')
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(np.asarray(rm), num_members, replace=False))
    nonmembers = np.sort(rng.choice(np.asarray(rn), num_nonmembers, replace=False))
    return SplitManifest(
      dataset, members, nonmembers, seed, ranges=f'{member_range}|{nonmember_range}'
    )
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
    )
  except data_lib.DataError as e:
    raise data_lib.DataError(f'{path}: {e}') from e
  except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise data_lib.DataError(f'{path}: not a valid split manifest ({e!r})') from e


def _ranges(split_cfg) -> str:
  m, n = split_cfg.get('member_range', ''), split_cfg.get('nonmember_range', '')
  return f'{m}|{n}' if m or n else ''


def resolve(
  split_cfg, source: data_lib.ImageSource, workdir: str, write: bool = True
) -> SplitManifest:
  """The split of a run: from ``split.file``, else ``workdir/split.json``, else made and written.

  A split made from the config must match one already in the workdir (same dataset, counts and
  seed); image hashes are filled in when missing and checked when present.
  """
  path = os.path.join(workdir, 'split.json')
  if split_cfg.file:
    manifest = load(split_cfg.file, source.name)
    where = split_cfg.file
  elif epath.Path(path).exists():
    manifest = load(path)
    where = path
    ranges = _ranges(split_cfg)
    want = (source.name, split_cfg.num_members, split_cfg.num_nonmembers, split_cfg.seed, ranges)
    have = (
      manifest.dataset,
      len(manifest.members),
      len(manifest.nonmembers),
      manifest.seed,
      manifest.ranges,
    )
    if want != have:
      raise data_lib.DataError(
        f'{path}: the workdir split (dataset, members, non-members, seed) = {have} differs '
        f'from the config {want}; use another workdir or set config.split.file={path}'
      )
  else:
    manifest = make_split(
      source.name,
      len(source),
      split_cfg.num_members,
      split_cfg.num_nonmembers,
      split_cfg.seed,
      split_cfg.get('member_range', ''),
      split_cfg.get('nonmember_range', ''),
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
# others ('source', 'name', 'split', 'data_dir') are recorded to say where the data came from.
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


def training_data(data_cfg, source: data_lib.ImageSource, split: SplitManifest) -> dict:
  """The identity of a training set: where the images come from, how they are prepared, and
  SHA-256s of the sorted member indices and of the sorted member image hashes (so neither the
  order of a split file nor a moved copy of the data changes it)."""
  if split.member_image_hashes is None:
    raise ValueError('training_data needs a manifest from splits.resolve')
  return {
    'source': data_cfg.source,
    'name': data_cfg.name,
    'split': data_cfg.split,
    'data_dir': data_cfg.data_dir,
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
