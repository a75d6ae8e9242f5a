"""The audit: score members and non-members with every attack, resumably; metrics; report.

Scores are written in shard files ``W/scores/shard_NNNNN.npz`` of ``audit.shard_size`` images
(members first, then non-members, in split order), each written atomically, so a run killed at
any moment leaves only whole shards; rerunning skips them and ends with the same scores as an
uninterrupted run. ``W/audit_config.json`` records what the scores depend on: the config fields
and the audited target's identity (checkpoint step and SHA-256 of its EMA weights). A workdir
holding results of another config or target is refused, unless ``overwrite``: then, once every
input (target, data source, split, training data) has been validated, the old results
(``audit_config.json``, ``scores/``, ``metrics.json``, ``report.html``, ``report/``) move together
to ``W/superseded/<time>/``; nothing is deleted.

All processes compute every batch (each its slice); only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from drc_jax import attacks as attacks_lib
from drc_jax import calibration as calibration_lib
from drc_jax import checkpoints, errors, fileio, parallel, progress, shipped, streams, validate
from drc_jax import data as data_lib
from drc_jax import drc as drc_lib
from drc_jax import metrics as metrics_lib
from drc_jax import report as report_lib
from drc_jax import samples as samples_lib
from drc_jax import splits as splits_lib
from drc_jax import target as target_lib

AUDIT_CONFIG = 'audit_config.json'
SCORES_DIR = 'scores'
DATASET_JSON = 'dataset.json'  # written by --mode=dataset (dataset_inference.py)
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


def fingerprint(config, target: Target) -> dict:
  """What the per-image scores depend on: the config fields (not batch size, plots or bootstrap)
  and the audited target (checkpoint step, SHA-256 of its EMA weights)."""
  c = config.to_dict()
  audit = {k: c['audit'][k] for k in ('shard_size', 'checkpoint', 'max_images')}
  return json.loads(
    json.dumps(
      {
        'seed': c['seed'],
        'data': c['data'],
        'split': c['split'],
        'diffusion': c['diffusion'],
        'model': c['model'],
        'drc': c['drc'],
        'attacks': c['attacks'],
        'audit': audit,
        'target': {'step': target.step, 'ema_sha256': target.ema_sha256},
      },
      default=list,
    )
  )


def recorded_fingerprint(workdir) -> dict | None:
  """The fingerprint of the results in ``workdir`` (None: none recorded)."""
  path = epath.Path(workdir) / AUDIT_CONFIG
  if not path.exists():
    return None
  try:
    doc = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.WorkdirError(
      f'{path}: not valid JSON ({e}); move it away with the results it '
      f'describes, or use another --workdir'
    ) from e
  if not isinstance(doc, dict):
    raise errors.WorkdirError(f'{path}: expected a JSON object')
  return doc


def _diff(a, b, prefix='') -> list[str]:
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f'{prefix}{k}.')
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
  return _diff(old, fp)


def check_scores_match(config, workdir: str, target: Target) -> None:
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


def _move_aside(workdir: str) -> epath.Path:
  """Moves every result file of ``workdir`` into a new ``W/superseded/<time>/``; returns it."""
  root = epath.Path(workdir) / SUPERSEDED_DIR
  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  dst, n = root / stamp, 1
  while dst.exists():
    dst, n = root / f'{stamp}-{n}', n + 1
  dst.mkdir(parents=True)
  for name in RESULTS:
    src = epath.Path(workdir) / name
    if src.exists():
      fileio.move(src, dst / name)
  return dst


def check_workdir(config, workdir: str, overwrite: bool, target: Target) -> None:
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
  parallel.sync('audit_config_written')


def _items(split: splits_lib.SplitManifest, max_images: int) -> tuple[np.ndarray, np.ndarray]:
  """(is_member int8 [N], dataset index int64 [N]): members first, then non-members."""
  mem, non = split.members, split.nonmembers
  if max_images:
    mem, non = mem[:max_images], non[:max_images]
  if len(mem) < 2 or len(non) < 2:
    raise data_lib.DataError(
      f'split of {split.dataset or "the audit"}: {len(mem)} members and {len(non)} non-members '
      f'to audit (config.audit.max_images={max_images}); the calibrated decision needs at '
      f'least 2 of each'
    )
  return (
    np.concatenate([np.ones(len(mem), np.int8), np.zeros(len(non), np.int8)]),
    np.concatenate([mem, non]),
  )


def _shard_path(workdir, i: int) -> epath.Path:
  return epath.Path(workdir) / SCORES_DIR / f'shard_{i:05d}.npz'


def _write_npz(path, arrays: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fileio.atomic_write_bytes(path, buf.getvalue())


def _read_npz(path) -> dict[str, np.ndarray]:
  with epath.Path(path).open('rb') as f:
    z = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return {k: z[k] for k in z.files}


class Target:
  """The audited model: EMA params replicated on the mesh, with its schedule and identity."""

  def __init__(self, config, workdir: str, mesh):
    path = shipped.resolve(config.audit.checkpoint) if config.audit.checkpoint else workdir
    target = target_lib.load_target(path)  # a workdir or one step directory W/checkpoints/N
    self.model, self.schedule, self.step = target.model, target.schedule, target.step
    params = jax.tree_util.tree_map(np.asarray, target.params)
    unet = self.model.config
    if (unet.resolution, unet.in_channels) != (config.data.resolution, config.data.channels):
      raise validate.ConfigError(
        f'the target in {path} takes {unet.resolution}x{unet.resolution}x{unet.in_channels} '
        f'images but config.data asks for {config.data.resolution}x{config.data.resolution}x'
        f'{config.data.channels}'
      )
    validate.check_timesteps(
      config, self.schedule.num_timesteps, f'num_timesteps of the target in {path}'
    )
    self.ema_sha256 = checkpoints.tree_sha256(params)  # part of what the scores depend on
    self.workdir = checkpoints.workdir_of(path)
    self.trained_on = checkpoints.trained_on(self.workdir)
    self.params = parallel.replicate(mesh, params)
    self.path = path


@dataclasses.dataclass
class Scorer:
  """What scoring needs, built once per run: the target on the mesh and every attack, jitted."""

  target: Target
  mesh: Any
  names: list[str]
  attacks: dict[str, attacks_lib.Attack]
  score_fn: Callable


def make_scorer(config, workdir: str) -> Scorer:
  """The target of ``workdir`` (or ``audit.checkpoint``) and one jitted program of all attacks."""
  names = validate.attack_names(config)
  mesh = parallel.make_mesh()
  target = Target(config, workdir, mesh)
  attacks = attacks_lib.make_attacks(config, target.model, target.schedule, names)
  for a in attacks.values():
    logging.info('attack %-6s %5d model calls per image', a.name, a.nfe)
  return Scorer(target, mesh, names, attacks, attacks_lib.make_batch_scorer(attacks, mesh))


def score_split(
  config, workdir: str, overwrite: bool = False
) -> tuple[Scorer, data_lib.ImageSource]:
  """Scores every image of the split not yet scored (into ``W/scores``); the audit's first half.

  Every input is validated before the first file changes: the config, the target (checkpoint,
  integrity, schedule, image size), the data source, the split and the data the target was
  trained on; only then ``check_workdir`` refuses or (``overwrite``) moves old results aside.
  """
  validate.check(config)
  scorer = make_scorer(config, workdir)
  target = scorer.target
  source = data_lib.make_source(config.data)
  split = splits_lib.resolve(config.split, source, workdir, write=False)
  if target.trained_on is None:
    logging.info(
      'the target in %s records no training data (imported, or trained by an older '
      'drc_jax): its members are not checked against the split',
      target.workdir,
    )
  splits_lib.check_trained_on(
    target.trained_on,
    splits_lib.training_data(config.data, source, split),
    str(target.workdir / checkpoints.MODEL_JSON),
  )
  is_member, indices = _items(split, config.audit.max_images)
  data_lib.load_images(source, indices[:1], config.data)  # the preprocessing settings work
  check_workdir(config, workdir, overwrite, target)
  if parallel.is_writer():
    splits_lib.write_to_workdir(split, workdir)
  score_images(config, workdir, scorer, source, is_member, indices)
  return scorer, source


def run_audit(config, workdir: str, overwrite: bool = False) -> dict:
  """Scores every image not yet scored, then writes metrics and the report. Returns metrics."""
  scorer, source = score_split(config, workdir, overwrite)
  return write_results(
    config, workdir, target=scorer.target, attacks=scorer.attacks, mesh=scorer.mesh, source=source
  )


def score_images(
  config,
  workdir: str,
  scorer: Scorer,
  source: data_lib.ImageSource,
  is_member: np.ndarray,
  indices: np.ndarray,
  key_indices: np.ndarray | None = None,
) -> None:
  """Scores ``source`` images at ``indices`` into shards ``workdir/scores``, skipping whole shards.

  Args:
    config: the run config.
    workdir: where the ``scores/`` folder is.
    scorer: from ``make_scorer``.
    source: the images.
    is_member: int8 [N], the ``split`` column (1 member, 0 non-member, -1 unknown).
    indices: int64 [N], indices into ``source``, in shard order.
    key_indices: int64 [N], what each image's attack keys are derived from (default ``indices``).
  """
  names, mesh, target, score_fn = scorer.names, scorer.mesh, scorer.target, scorer.score_fn
  key_indices = indices if key_indices is None else key_indices
  shard, bs = config.audit.shard_size, config.audit.batch_size
  n_shards = -(-len(indices) // shard)
  done = {i for i in range(n_shards) if _shard_path(workdir, i).exists()}
  parallel.sync('shards_listed')  # every process decides the same shards to skip
  todo = [i for i in range(n_shards) if i not in done]
  logging.info(
    '%d images in %d shards: %d done, %d to score', len(indices), n_shards, len(done), len(todo)
  )
  p_idx, p_cnt = jax.process_index(), jax.process_count()
  total = sum(min(shard, len(indices) - i * shard) for i in todo)
  speed = progress.Throughput(total)  # leaves out the first batch (compilation)
  for i in todo:
    lo, hi = i * shard, min((i + 1) * shard, len(indices))
    rows: dict[str, list] = {}
    for slot in data_lib.batch_slots(hi - lo, bs, p_idx, p_cnt):
      pos = np.where(slot.valid, lo + slot.positions, lo)  # padding repeats the shard's first
      images, _, _ = data_lib.load_images(source, indices[pos], config.data)
      keys = attacks_lib.keys_for(names, config.seed, key_indices[pos])
      out = score_fn(
        target.params,
        {n: parallel.shard_batch(mesh, k) for n, k in keys.items()},
        parallel.shard_batch(mesh, images),
      )
      valid = parallel.to_host(parallel.shard_batch(mesh, slot.valid))
      for name, v in out.items():
        rows.setdefault(name, []).append(parallel.to_host(v)[valid])
      speed.update(int(valid.sum()))
    raw, labels = source.read(indices[lo:hi])
    arrays = {
      'split': is_member[lo:hi],
      'index': indices[lo:hi],
      'label': labels,
      'hash': np.asarray(data_lib.image_hashes(raw)),
    }
    for name, chunks in rows.items():
      v = np.concatenate(chunks).astype(np.float64)
      if name == 'drc':
        arrays['drc/sim'] = v
        arrays['score/drc'] = v.mean(axis=1)
      else:
        arrays[f'score/{name}'] = v
    if len(arrays['score/' + names[0]]) != hi - lo:
      raise RuntimeError(f'shard {i}: scored {len(arrays["score/" + names[0]])} of {hi - lo}')
    if parallel.is_writer():
      _write_npz(_shard_path(workdir, i), arrays)
    logging.info(
      'scored shard %d/%d: %d/%d images, %s',
      i + 1,
      n_shards,
      speed.done,
      total,
      speed.describe('images'),
    )
  parallel.sync('scores_written')


def load_scores(workdir: str) -> dict[str, np.ndarray]:
  """Concatenates every score shard into one table (rows in audit order)."""
  files = sorted((epath.Path(workdir) / SCORES_DIR).glob('shard_*.npz'))
  if not files:
    raise errors.WorkdirError(
      f'{epath.Path(workdir) / SCORES_DIR}: no score shards; run --mode=audit first'
    )
  parts = [_read_npz(f) for f in files]
  numbers = [int(f.name[6:11]) for f in files]
  if numbers != list(range(len(files))):
    raise errors.WorkdirError(
      f'{workdir}/{SCORES_DIR}: shards missing among {numbers}; rerun the audit'
    )
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _json_safe(d):
  return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


def compute_metrics(config, table: dict[str, np.ndarray], nfe: dict[str, int]) -> dict:
  """Per attack: threshold-free metrics with bootstrap CIs, and the calibrated decision."""
  members = table['split'] == 1
  out = {}
  for key in sorted(k for k in table if k.startswith('score/')):
    name = key[len('score/') :]
    s = table[key]
    m = metrics_lib.attack_metrics(
      s[members], s[~members], bootstrap=config.audit.bootstrap, seed=config.seed
    )
    cal = metrics_lib.calibrate(
      s[members], s[~members], fraction=config.audit.calibration_fraction, seed=config.seed
    )
    cal.pop('member_heldout'), cal.pop('nonmember_heldout')
    m['calibrated'] = cal
    m['nfe_per_image'] = nfe.get(name)
    out[name] = m
  return _json_safe(out)


def drc_votes(config, table) -> tuple[np.ndarray, dict] | tuple[None, None]:
  """Votes of the K restorations at the per-restoration threshold, and the agree curve.

  The threshold is the ``drc.vote_quantile`` quantile of the non-members' similarities
  (all restorations pooled); an image's votes count its restorations above it.
  """
  if 'drc/sim' not in table:
    return None, None
  sims, members = table['drc/sim'], table['split'] == 1
  threshold = float(np.quantile(sims[~members], config.drc.vote_quantile))
  votes = drc_lib.votes(sims, threshold)
  agree = metrics_lib.agree_curve(votes[members], votes[~members], sims.shape[1])
  agree['threshold'] = threshold
  return votes, _json_safe(agree)


def _pick_evidence(table, metrics, n: int) -> list[tuple[str, int]]:
  """Rows for the panels: highest, lowest and borderline (nearest the calibrated threshold)."""
  s = (
    table['score/drc']
    if 'score/drc' in table
    else table[sorted(k for k in table if k.startswith('score/'))[0]]
  )
  order = np.argsort(-s, kind='stable')
  name = 'drc' if 'score/drc' in table else sorted(metrics)[0]
  thr = metrics[name]['calibrated']['threshold']
  border = np.argsort(np.abs(s - thr), kind='stable')
  return (
    [('highest', int(r)) for r in order[:n]]
    + [('lowest', int(r)) for r in order[::-1][:n]]
    + [('borderline', int(r)) for r in border[:n]]
  )


def write_results(
  config,
  workdir: str,
  target: Target | None = None,
  attacks=None,
  mesh=None,
  source: data_lib.ImageSource | None = None,
) -> dict:
  """metrics.json, the plots, the evidence panels and report.html from the saved scores."""
  names = validate.attack_names(config)
  mesh = mesh or parallel.make_mesh()
  target = target or Target(config, workdir, mesh)
  check_scores_match(config, workdir, target)
  table = load_scores(workdir)
  attacks = attacks or attacks_lib.make_attacks(config, target.model, target.schedule, names)
  metrics = compute_metrics(config, table, {n: a.nfe for n, a in attacks.items()})
  if config.audit.calibration == 'quantile':
    source = source or data_lib.make_source(config.data)
    features = calibration_lib.table_features(source, table['index'], config.data)
    for name, entry in calibration_lib.per_image_calibration(config, table, features).items():
      metrics[name]['per_image_calibration'] = _json_safe(entry)
  votes, agree = drc_votes(config, table)
  if votes is not None:
    table['drc/votes'] = votes
    metrics['drc']['agree'] = agree
  source = source or data_lib.make_source(config.data)
  if 'drc' in attacks:
    evidence = _evidence(config, table, metrics, target, mesh, source)
  else:
    evidence = []
  sample_info = _samples(config, workdir, table, target, source)
  if parallel.is_writer():
    fileio.atomic_write_text(
      epath.Path(workdir) / 'metrics.json', json.dumps(metrics, indent=1, sort_keys=True)
    )
    summary = (
      f'target: {target.path} (step {target.step}, EMA SHA-256 '
      f'{target.ema_sha256[:16]})\n'
      f'data: {config.data.source} {config.data.name}/{config.data.split} '
      f'{config.data.resolution}x{config.data.resolution}x{config.data.channels}\n'
      f'members: {int(np.sum(table["split"] == 1))}, non-members: '
      f'{int(np.sum(table["split"] == 0))}\n'
      f'DRC: mask {config.drc.mask} rho={config.drc.mask_ratio}, restorer '
      f'{config.drc.restorer} ({config.drc.steps} steps), K={config.drc.num_restorations}'
      f', comparator {config.drc.comparator}'
    )
    if sample_info is not None:
      fileio.atomic_write_text(
        epath.Path(workdir) / 'samples.json',
        json.dumps(sample_info['figures'], indent=1, sort_keys=True),
      )
    path = report_lib.write_report(
      workdir,
      table,
      metrics,
      evidence,
      config_summary=summary,
      agree=agree,
      samples=sample_info,
      dataset=read_dataset_result(config, workdir, target),
    )
    logging.info('report: %s', path)
  parallel.sync('report_written')
  return metrics


def _samples(config, workdir: str, table, target: Target, source) -> dict | None:
  """The target's samples against its members and real non-members (``drc_jax.samples``)."""
  num = int(config.audit.num_samples)
  if num <= 0:
    return None
  member_idx = table['index'][table['split'] == 1]
  nonmember_idx = table['index'][table['split'] == 0]
  members, _, _ = data_lib.load_images(source, member_idx, config.data)
  nonmembers, _, _ = data_lib.load_images(source, nonmember_idx[:num], config.data)
  info = samples_lib.load_or_generate(
    workdir,
    target,
    members,
    nonmembers,
    num=num,
    seed=config.seed,
    batch_size=config.audit.batch_size,
  )
  info['nearest_index'] = member_idx[info['nearest_pos']]  # dataset index of each nearest member
  return info


def read_dataset_result(config, workdir: str, target: Target) -> dict | None:
  """``dataset.json`` when it was computed from this config's scores, else None."""
  path = epath.Path(workdir) / DATASET_JSON
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  if result.get('fingerprint') != fingerprint(config, target):
    logging.warning('%s was computed from scores of another config: not in the report', path)
    return None
  return result


def _evidence(
  config, table, metrics, target: Target, mesh, source: data_lib.ImageSource
) -> list[dict]:
  """Recomputes the DRC evidence (exact: keys are per image) for the selected rows."""
  picks = _pick_evidence(table, metrics, config.audit.num_evidence)
  rows = np.asarray([r for _, r in picks])
  scorer = drc_lib.make_drc(config.drc, target.model, target.schedule, mesh)
  bs = config.audit.batch_size
  idx = table['index'][rows]
  pad = np.resize(idx, -(-len(idx) // bs) * bs)  # fixed batch shape: one compiled program
  degraded, restored = [], []
  for lo in range(0, len(pad), bs):
    images, _, _ = data_lib.load_images(source, pad[lo : lo + bs], config.data)
    keys = drc_lib.image_keys(config.seed, streams.ATTACKS['drc'], pad[lo : lo + bs])
    d, r = scorer.evidence(
      target.params, parallel.shard_batch(mesh, keys), parallel.shard_batch(mesh, images)
    )
    degraded.append(parallel.to_host(d))
    restored.append(parallel.to_host(r))
  degraded, restored = np.concatenate(degraded), np.concatenate(restored)
  originals, _, _ = data_lib.load_images(source, idx, config.data)
  s = table['score/drc']
  non = s[table['split'] == 0]
  thr = metrics['drc']['calibrated']['threshold']
  out = []
  for j, (kind, r) in enumerate(picks):
    sims = table['drc/sim'][r]  # [K]
    # The restoration whose similarity is the image's median (the lower middle one for even K):
    # the typical restoration, not a lucky or unlucky one; all K are shown as thumbnails.
    k_med = int(np.argsort(sims, kind='stable')[(len(sims) - 1) // 2])
    out.append(
      {
        'kind': kind,
        'index': int(table['index'][r]),
        'split': int(table['split'][r]),
        'label_name': data_lib.label_name(source, int(table['label'][r])),
        'score': float(s[r]),
        'percentile': float(metrics_lib.percentile_among(s[r : r + 1], non)[0]),
        'decision': 'member' if s[r] >= thr else 'non-member',
        'original': originals[j],
        'degraded': degraded[j, k_med],
        'restored': restored[j, k_med],
        'shown_restoration': k_med,
        'restorations': restored[j],
        'similarities': sims.tolist(),
      }
    )
  return out
