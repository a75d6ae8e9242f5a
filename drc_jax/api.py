"""The Python API: score images against a target without a workdir.

  auditor = drc_jax.Auditor('shipped:fashion_mnist')
  images = auditor.split_images(members=1, nonmembers=1)
  result = auditor.score(images)      # AuditResult: scores, decisions, p-values, DRC evidence

An ``Auditor`` runs the same compiled program as ``python -m drc_jax.main --mode=audit`` (every
attack of the config in one sharded jit), on images given as file paths, PIL images or arrays.
Each image's random draws (Loss's noise, DRC's masks and restorations) come from a key derived from
the image's own content, so its score never depends on its batch or on the other images.

Decisions are calibrated on known non-members only: a target that ships its calibration scores
(``thresholds.json``, written by ``python -m drc_jax.analysis thresholds`` from an audit) gives each
image the empirical p-value ``(1 + #{calibration non-member scores >= its score}) / (n + 1)``, and
the decision "member" when that p-value is at most ``fpr``. For non-members exchangeable with the
calibration ones, P(decision member) <= fpr. An attack the file holds no scores for is skipped,
and ``AuditResult.notes`` says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from drc_jax.attacks import registry as attacks_lib
from drc_jax.audit import scoring, validate
from drc_jax.core import config_base, errors, parallel
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib
from drc_jax.drc import scorer as drc_lib
from drc_jax.targets import shipped


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """The scores of a batch of images, in the order given.

  Attributes:
    attacks: the attacks that ran, in config order.
    scores: {attack: float64 [B]}, higher = more member-like.
    decisions: {attack: bool [B]}, True = member at ``fpr`` (None: the target ships no
      calibration scores).
    p_values: {attack: float64 [B]}, each image's p-value among the calibration non-members
      (None likewise).
    fpr: the false-positive rate the decisions are calibrated to.
    thresholds: {attack: score above which an image is a member at ``fpr``} (inf: no score can
      be at this fpr with the shipped calibration set; None without calibration scores).
    evidence: DRC's evidence ({'original' [B, H, W, C], 'degraded' and 'restored'
      [B, K, H, W, C], 'similarities' [B, K]}; None without DRC or when not asked for).
    image_sha256: SHA-256 of each preprocessed image (what its random draws are derived from).
    notes: what the auditor left out and why (attacks the target ships no calibration scores
      for), one line each; empty when nothing was.
  """

  attacks: tuple[str, ...]
  scores: dict[str, np.ndarray]
  decisions: dict[str, np.ndarray] | None
  p_values: dict[str, np.ndarray] | None
  fpr: float
  thresholds: dict[str, float] | None
  evidence: dict[str, np.ndarray] | None
  image_sha256: list[str]
  notes: tuple[str, ...] = ()

  def table(self) -> str:
    """One line per image and attack: score, p-value and decision."""
    lines = [f'{"image":>5}  {"attack":<6}  {"score":>12}  {"p-value":>7}  decision']
    for i in range(len(self.image_sha256)):
      for a in self.attacks:
        p = '' if self.p_values is None else f'{self.p_values[a][i]:.3f}'
        d = '' if self.decisions is None else ('member' if self.decisions[a][i] else 'non-member')
        lines.append(f'{i:>5}  {a:<6}  {self.scores[a][i]:>12.5g}  {p:>7}  {d}')
    return '\n'.join(lines)


def _default_config(target: str) -> str:
  if str(target).startswith(shipped.PREFIX):
    return os.path.join(config_base.configs_dir(), f'{str(target)[len(shipped.PREFIX) :]}.py')
  raise validate.ConfigError(
    f'Auditor({target!r}): config is required for a target that is not shipped (the config '
    f'file, e.g. configs/cifar10.py, says how the target is attacked and its data read)'
  )


class Auditor:
  """A target with its attacks compiled, ready to score images.

  Args:
    target: ``shipped:<name>``, a drc_jax workdir, a checkpoint step directory or a safetensors
      target directory (anything ``drc_jax.load_target`` takes).
    config: the config (a ``ConfigDict``, or a config file ``path[:variant]``); default for a
      shipped target: ``configs/<name>.py``, the config it was trained and audited with.
    attacks: attack names (default: the config's ``attacks.names``). An attack the target's
      ``thresholds.json`` has no calibration scores for is skipped, with a line in ``notes``
      (when it has none for any of them, every attack runs and none is calibrated).

  Raises:
    drc_jax.UserError: a config field, the target or its files are wrong (the message names it).
  """

  def __init__(self, target: str = 'shipped:fashion_mnist', config=None, attacks=None):
    if config is None or isinstance(config, str):
      config = config_base.load_config(config or _default_config(target))
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    config.audit.checkpoint = str(target)
    if attacks is not None:
      config.attacks.names = ','.join(attacks) if not isinstance(attacks, str) else attacks
    validate.check(config)
    calibrated, notes = _calibrated_names(config, shipped.resolve(str(target)))
    self.notes = tuple(notes)
    self.config = config
    self.scorer = scoring.make_scorer(config, workdir='')
    self.target_dir = self.scorer.target.path
    self.calibration = None
    # DRC's rule (config.drc.aggregation; 'agree' needs the vote threshold its calibration fit)
    self.drc_rule = {'aggregation': config.drc.aggregation, 'vote_threshold': None}
    if calibrated:
      self.calibration = shipped.read_thresholds(self.target_dir, self.scorer.names)
      if 'drc' in self.scorer.names:
        self.drc_rule = _drc_rule(config, self.target_dir)
    elif config.drc.aggregation == 'agree' and 'drc' in self.scorer.names:
      raise validate.ConfigError(
        "config.drc.aggregation='agree' needs the vote threshold fitted on calibration "
        f'non-members, and {self.target_dir} ships no {shipped.THRESHOLDS_JSON}'
      )

  @property
  def attacks(self) -> tuple[str, ...]:
    return tuple(self.scorer.names)

  def split_images(self, members: int = 0, nonmembers: int = 0) -> np.ndarray:
    """The first ``members`` members and ``nonmembers`` non-members of the target's split
    (``split.json`` beside the target), preprocessed: float32 [n, R, R, C] in [-1, 1]."""
    path = os.path.join(str(self.target_dir), shipped.SPLIT_JSON)
    if not os.path.exists(path):
      raise errors.UserError(f'{path}: not found; this target records no member split')
    split = splits_lib.load(path)
    if members > len(split.members) or nonmembers > len(split.nonmembers):
      raise errors.UserError(
        f'{path}: {len(split.members)} members and {len(split.nonmembers)} non-members; '
        f'asked for {members} and {nonmembers}'
      )
    indices = np.concatenate([split.members[:members], split.nonmembers[:nonmembers]])
    images, _, _ = data_lib.load_images(
      splits_lib.run_source(self.config), indices, self.config.data
    )
    return images

  def preprocess(self, images) -> np.ndarray:
    """File paths, PIL images, uint8 arrays ([H, W], [H, W, C], [N, H, W] or [N, H, W, C]) or
    float arrays already prepared ([N, R, R, C] in [-1, 1]) -> float32 [N, R, R, C]."""
    d = self.config.data
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
      want = (d.resolution, d.resolution, d.channels)
      if images.ndim != 4 or images.shape[1:] != want:
        raise data_lib.DataError(
          f'images: float arrays must be prepared images [N, {", ".join(map(str, want))}] in '
          f'[-1, 1], got {images.dtype} {images.shape} (pass uint8 pixels to have them prepared)'
        )
      return images.astype(np.float32)
    if isinstance(images, np.ndarray):  # uint8: one [H, W] / [H, W, C] image or a batch
      single = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3))
      images = [images] if single else list(images)
    if isinstance(images, (str, os.PathLike, Image.Image)):
      images = [images]
    out = []
    for i, im in enumerate(images):
      what = str(im) if isinstance(im, (str, os.PathLike)) else f'images[{i}]'
      raw = _raw_pixels(im, what)
      out.append(data_lib.preprocess(raw[None], d, what=what)[0])
    if not out:
      raise data_lib.DataError('images: no image given')
    return np.stack(out)

  def score(self, images, fpr: float = 0.05, evidence: bool = True, captions=None) -> AuditResult:
    """Every attack's score of ``images`` (see ``preprocess`` for what they may be), the
    calibrated decisions at ``fpr`` and DRC's evidence. A text-conditioned target (Stable
    Diffusion) audits each image under its caption: ``captions``, one str per image."""
    if not 0.0 < fpr < 1.0:
      raise validate.ConfigError(f'fpr: {fpr} not in (0, 1)')
    x = self.preprocess(images)
    text = self.scorer.target.is_text_conditioned
    if text and (captions is None or isinstance(captions, str) or len(captions) != len(x)):
      got = (
        'none' if captions is None else ('a str' if isinstance(captions, str) else len(captions))
      )
      raise data_lib.DataError(
        f'captions: a text-conditioned target needs one caption per image ({len(x)}), got {got}'
      )
    if not text and captions is not None:
      raise data_lib.DataError('captions: the target is not text-conditioned; pass none')
    captions = None if captions is None else [str(c) for c in captions]
    hashes = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in x]
    key_indices = np.asarray([int(h[:8], 16) for h in hashes], np.int64)  # uint32 range
    s = self.scorer
    n_dev = len(s.mesh.devices.flat)
    bs = min(self.config.audit.batch_size, -(-len(x) // n_dev) * n_dev)
    rows: dict[str, list[np.ndarray]] = {}
    ev: dict[str, list[np.ndarray]] = {}
    for lo in range(0, len(x), bs):
      chunk, keyi = x[lo : lo + bs], key_indices[lo : lo + bs]
      n = len(chunk)
      pad = np.resize(np.arange(n), bs)  # a fixed batch shape: padding repeats the chunk
      batch = parallel.shard_batch(s.mesh, chunk[pad])
      keys = {
        k: parallel.shard_batch(s.mesh, v)
        for k, v in attacks_lib.keys_for(s.names, self.config.seed, keyi[pad]).items()
      }
      side = self._side(chunk[pad], None if captions is None else [captions[lo + i] for i in pad])
      out = s.score_fn(s.target.params, s.aux, keys, batch, side)
      for name, v in out.items():
        rows.setdefault(name, []).append(parallel.to_host(v)[:n].astype(np.float64))
      if evidence and s.evidence_fn is not None:  # the same keys as DRC's scores
        deg, rest = s.evidence_fn(s.target.params, keys['drc'], batch, s.aux.get('drc'), side)
        ev.setdefault('degraded', []).append(parallel.to_host(deg)[:n])
        ev.setdefault('restored', []).append(parallel.to_host(rest)[:n])
    raw = {name: np.concatenate(v) for name, v in rows.items()}
    rule = self.drc_rule
    scores = {
      a: drc_lib.aggregate(raw[a], rule['aggregation'], rule['vote_threshold'])
      if a == 'drc'
      else raw[a]
      for a in s.names
    }
    evidence_out = None
    if ev:
      evidence_out = {k: np.concatenate(v) for k, v in ev.items()}
      evidence_out['original'] = x
      evidence_out['similarities'] = raw['drc']
    decisions = p_values = thresholds = None
    if self.calibration is not None:
      p_values, decisions, thresholds = {}, {}, {}
      for a in s.names:
        ref = self.calibration[a]  # calibration non-member scores, sorted descending
        at_least = len(ref) - np.searchsorted(ref[::-1], scores[a], side='left')
        p_values[a] = (1.0 + at_least) / (len(ref) + 1.0)
        decisions[a] = p_values[a] <= fpr
        m = int(np.floor(fpr * (len(ref) + 1) + 1e-9)) - 1  # members: at most m at or above
        thresholds[a] = float(ref[m]) if m >= 0 else float('inf')
    return AuditResult(
      self.attacks, scores, decisions, p_values, fpr, thresholds, evidence_out, hashes, self.notes
    )

  def _side(self, images: np.ndarray, captions=None) -> dict[str, Any]:
    """Per-image host inputs (DRC's face masks, the captions' token ids) from the prepared
    images' pixels and their captions."""
    raw = np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    side, _ = self.scorer.side_fn(_ArraySource(raw, captions), np.arange(len(raw)))
    return {k: parallel.shard_batch(self.scorer.mesh, v) for k, v in side.items()}


def _drc_rule(config, directory) -> dict:
  """The DRC rule of the target's calibration scores; a config asking for another is an error
  (its scores would not be comparable with the calibration's)."""
  rule = shipped.read_drc_rule(directory)
  if rule['aggregation'] != config.drc.aggregation:
    raise validate.ConfigError(
      f'config.drc.aggregation={config.drc.aggregation!r}, but the calibration scores of '
      f'{os.path.join(str(directory), shipped.THRESHOLDS_JSON)} are DRC scores under '
      f'{rule["aggregation"]!r}: use that rule or write thresholds for this one '
      '(python -m drc_jax.analysis thresholds)'
    )
  return rule


def _calibrated_names(config, directory) -> tuple[bool, list[str]]:
  """Keeps in ``config.attacks.names`` the attacks the target's ``thresholds.json`` calibrates.

  Returns (whether the remaining attacks are calibrated, notes on what was left out). A target
  without ``thresholds.json``, or one that calibrates none of the attacks, keeps them all
  uncalibrated (scores without decisions).
  """
  names = validate.attack_names(config)
  have = shipped.calibrated_attacks(directory)
  if have is None:
    return False, []
  missing = [a for a in names if a not in have]
  file = os.path.join(str(directory), shipped.THRESHOLDS_JSON)
  if not missing:
    return True, []
  if len(missing) == len(names):
    return False, [
      f'{file} has no calibration scores for {missing}: scores only, no decisions or p-values'
    ]
  config.attacks.names = ','.join(a for a in names if a not in missing)
  return True, [
    f'{", ".join(missing)}: skipped, no calibration scores in {file} (it has {have}; '
    f'python -m drc_jax.analysis thresholds writes them)'
  ]


class _ArraySource:
  """Images in memory as an ``ImageSource`` (what DRC's face masks read)."""

  name = 'images'
  label_names: Sequence[str] = ()

  def __init__(self, raw: np.ndarray, captions=None):
    self._raw = raw
    if captions is not None:  # a text-conditioned target's captions (data/captions.py)
      self.captions = list(captions)

  def __len__(self) -> int:
    return len(self._raw)

  def read(self, indices):
    idx = np.asarray(indices, np.int64)
    return self._raw[idx], np.zeros(len(idx), np.int64)


def _raw_pixels(im, what: str) -> np.ndarray:
  """uint8 [H, W, C] of a path, a PIL image or a uint8 array."""
  if isinstance(im, (str, os.PathLike)):
    try:
      with Image.open(im) as pil:
        pil.load()
        im = pil.copy()
    except (OSError, ValueError) as e:
      raise data_lib.DataError(f'{what}: unreadable or corrupt image ({e})') from e
  if isinstance(im, Image.Image):
    im = np.asarray(data_lib.to_8bit(im, what))  # 'L' or 'RGB'
  arr = np.asarray(im)
  if arr.dtype != np.uint8:
    raise data_lib.DataError(f'{what}: expected uint8 pixels, got {arr.dtype}')
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
    raise data_lib.DataError(f'{what}: expected [H, W], [H, W, 1] or [H, W, 3], got {arr.shape}')
  return arr
