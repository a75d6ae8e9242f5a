"""DRC's cost frontier: AUC against model calls per image, from RePaint's published schedule down.

A benchmark, not a test (``python -m drc_jax.analysis frontier --out=runs/frontier``). The config's
DRC protocol (its mask, comparator and mean over K) is kept; only the restoration's cost changes:
RePaint from its published schedule (``protocol.REPAINT_PUBLISHED``, Lugmayr et al. 2022: 250
respaced steps with jumps of 10 x 10, 2,410 model calls per restoration; not DRC's paper, whose
protocol is ``protocol.PAPER``) down to 10 steps without jumps, each with K = 1, 2, ...
restorations. The images and their calibration/held-out parts are the sweep's
(``sweep.image_set``), and nothing is chosen on what is reported:

* the reference is RePaint's published setting's AUC on the calibration part;
* the CHOSEN setting is the cheapest (fewest model calls per image) whose calibration AUC is within
  ``tolerance`` of that reference;
* the table reports every row's held-out AUC and TPR at 1% FPR next to its calibration AUC, and the
  chosen setting's speed-up over RePaint's published setting in model calls and in measured
  seconds.

Every held-out AUC comes with its difference from RePaint's published setting's on the same
images and a
95% paired-bootstrap interval of that difference. Writes ``frontier.json``, ``frontier.md``,
``frontier.png`` (held-out AUC against calls) and ``frontier_sims.npz`` (the per-image
similarities of every setting, with the images' indices and parts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from drc_jax.analysis import sweep as sweep_lib
from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import plots
from drc_jax.core import errors, fileio, protocol
from drc_jax.drc import compare as compare_lib


def _repaint(steps: int, jump_length: int, jump_n_sample: int) -> dict[str, Any]:
  return dict(restorer='repaint', steps=steps, jump_length=jump_length, jump_n_sample=jump_n_sample)


REFERENCE_LABEL = "250 steps, jumps 10 x 10 (RePaint's published schedule)"

PARTS = ('calibration', 'held-out')  # the part a choice is made on, the part reported

# (label, RePaint overrides, K_max), costliest first; the first row is RePaint's published setting.
GRID: list[tuple[str, dict[str, Any], int]] = [
  (
    REFERENCE_LABEL,
    dict(protocol.REPAINT_PUBLISHED),
    1,
  ),
  ('100 steps, jumps 10 x 10', _repaint(100, 10, 10), 1),
  ('250 steps, jumps 10 x 2', _repaint(250, 10, 2), 1),
  ('100 steps, jumps 10 x 2', _repaint(100, 10, 2), 2),
  ('100 steps, no jumps', _repaint(100, 1, 1), 2),
  ('50 steps, jumps 10 x 2', _repaint(50, 10, 2), 2),
  ('50 steps, no jumps', _repaint(50, 1, 1), 2),
  ('25 steps, jumps 5 x 2', _repaint(25, 5, 2), 2),
  ('25 steps, no jumps', _repaint(25, 1, 1), 2),
  ('10 steps, no jumps', _repaint(10, 1, 1), 2),
]


@dataclasses.dataclass
class Point:
  setting: str
  k: int
  model_calls: int  # per image: K x calls per restoration
  seconds_per_image: float  # measured: the setting's restoration time x K / K_max, per image
  auc_calibration: float
  auc_heldout: float
  tpr_1pct_heldout: float
  overrides: dict
  # held-out AUC minus the reference's (RePaint's published setting), and its 95% paired-bootstrap
  # interval (set by run)
  delta_heldout: float = float('nan')
  delta_heldout_ci: tuple[float, float] = (float('nan'), float('nan'))


def points(
  label: str,
  overrides: dict,
  nfe: int,
  sims: np.ndarray,
  seconds_per_image: float,
  is_member: np.ndarray,
  heldout: np.ndarray,
) -> list[Point]:
  """One point per K = 1, 2, 4, ... <= K_max: the mean of the first K similarities [N, K_max]."""
  out = []
  k_max = sims.shape[1]
  for k in range(1, k_max + 1):
    if k & (k - 1):
      continue
    figures = sweep_lib.split_figures(sims[:, :k].mean(axis=1), is_member, heldout)
    out.append(Point(label, k, k * nfe, seconds_per_image * k / k_max, *figures, overrides))
  return out


def paired_delta(
  score: np.ndarray,
  reference: np.ndarray,
  is_member: np.ndarray,
  heldout: np.ndarray,
  *,
  resamples: int = 1000,
  seed: int = 0,
) -> tuple[float, tuple[float, float]]:
  """Held-out AUC of ``score`` minus that of ``reference`` (per-image scores of the same images),
  with a 95% interval from a paired bootstrap: the held-out members and non-members are resampled
  with replacement, the same draw for both scores."""
  mem = np.flatnonzero(heldout & (is_member == 1))
  non = np.flatnonzero(heldout & (is_member == 0))

  def delta(m, n):
    return metrics_lib.auc(score[m], score[n]) - metrics_lib.auc(reference[m], reference[n])

  rng = np.random.default_rng(seed)
  draws = [delta(rng.choice(mem, len(mem)), rng.choice(non, len(non))) for _ in range(resamples)]
  lo, hi = np.percentile(draws, [2.5, 97.5])
  return delta(mem, non), (float(lo), float(hi))


def choose(pts: list[Point], reference: Point, tolerance: float) -> Point:
  """The cheapest point within ``tolerance`` of ``reference`` by CALIBRATION AUC (ties: the higher
  calibration AUC). Held-out figures play no part."""
  ok = [p for p in pts if p.auc_calibration >= reference.auc_calibration - tolerance]
  return min(ok, key=lambda p: (p.model_calls, -p.auc_calibration))


def figures(
  grid,
  sims_of: dict[str, np.ndarray],
  nfe_of: dict[str, int],
  seconds_of: dict[str, float],
  is_member: np.ndarray,
  heldout: np.ndarray,
  tolerance: float,
) -> dict[str, Any]:
  """The frontier's figures from per-image similarities (label -> [N, K_max]): every point, the
  reference (the grid's first setting, K = 1), the choice made on the ``~heldout`` part alone and
  each point's paired difference from the reference on the ``heldout`` part."""
  pts: list[Point] = []
  for label, overrides, _ in grid:
    pts += points(
      label, overrides, nfe_of[label], sims_of[label], seconds_of[label], is_member, heldout
    )
  reference = pts[0]
  ref_score = sims_of[reference.setting][:, : reference.k].mean(axis=1)
  for p in pts:
    p.delta_heldout, p.delta_heldout_ci = paired_delta(
      sims_of[p.setting][:, : p.k].mean(axis=1), ref_score, is_member, heldout
    )
  chosen = choose(pts, reference, tolerance)
  return {
    'tolerance': tolerance,
    **sweep_lib.part_counts(is_member, heldout),
    'reference': dataclasses.asdict(reference),
    'chosen': dataclasses.asdict(chosen),
    'speedup_model_calls': reference.model_calls / chosen.model_calls,
    'speedup_seconds': reference.seconds_per_image / chosen.seconds_per_image,
    'points': [dataclasses.asdict(p) for p in pts],
  }


def run(
  config,
  target_path: str,
  out_dir: str,
  *,
  heldout_members: int,
  heldout_nonmembers: int,
  tolerance: float,
  batch_size: int,
  grid=None,
) -> dict[str, Any]:
  """Measures the frontier; writes frontier.json, frontier.md and frontier.png into ``out_dir``."""
  grid = GRID if grid is None else grid
  comparator = config.drc.comparator
  if comparator not in compare_lib.COMPARATORS:  # checked before any restoration is spent
    raise errors.UserError(
      f'drc.comparator={comparator!r}: the frontier compares pixels, one of '
      f'{sorted(compare_lib.COMPARATORS)}; set --config.drc.comparator to one of them'
    )
  target, images, indices, is_member, heldout = sweep_lib.image_set(
    config, target_path, out_dir, heldout_members, heldout_nonmembers
  )
  sims_of: dict[str, np.ndarray] = {}
  nfe_of: dict[str, int] = {}
  seconds_of: dict[str, float] = {}
  for label, overrides, k_max in grid:
    t0 = time.time()
    sims, nfe = sweep_lib.restore_all(config, target, images, indices, overrides, k_max, batch_size)
    seconds = time.time() - t0
    sims_of[label], nfe_of[label], seconds_of[label] = sims[comparator], nfe, seconds / len(images)
    new = points(label, overrides, nfe, sims_of[label], seconds_of[label], is_member, heldout)
    logging.info(
      'frontier: %-40s %5d calls/restoration, %.0f s; calibration AUC %s',
      label,
      nfe,
      seconds,
      ', '.join(f'K={p.k} {p.auc_calibration:.3f}' for p in new),
    )
  protocol = {
    'mask': config.drc.mask,
    'mask_ratio': config.drc.mask_ratio,
    'comparator': comparator,
    'aggregation': 'mean over K',
  }
  doc = {
    'target': target_path,
    'step': target.step,
    'protocol': protocol,
    **figures(grid, sims_of, nfe_of, seconds_of, is_member, heldout, tolerance),
  }
  os.makedirs(out_dir, exist_ok=True)
  # The per-image similarities, so that any other reading of the frontier needs no re-run.
  with open(os.path.join(out_dir, 'frontier_sims.npz'), 'wb') as f:
    np.savez(
      f,
      indices=indices,
      is_member=is_member,
      heldout=heldout,
      settings=np.array([label for label, _, _ in grid]),
      **{f'sims_{i}': sims_of[label] for i, (label, _, _) in enumerate(grid)},
    )
  write(doc, out_dir, 'frontier')
  return doc


def write(doc: dict[str, Any], out_dir: str, stem: str) -> None:
  """``stem``.json, .md (the table) and .png (held-out AUC against calls) in ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(out_dir, f'{stem}.json'), json.dumps(doc, indent=1))
  fileio.atomic_write_text(os.path.join(out_dir, f'{stem}.md'), format_table(doc))
  plot(doc, os.path.join(out_dir, f'{stem}.png'))


def _saved(run_dir: str) -> tuple[dict[str, Any], Any]:
  """(frontier.json, frontier_sims.npz) of a frontier run's output directory."""
  json_path = os.path.join(run_dir, 'frontier.json')
  npz_path = os.path.join(run_dir, 'frontier_sims.npz')
  for path in (json_path, npz_path):
    if not os.path.exists(path):
      raise errors.UserError(f'{path}: not found (a frontier run writes it; --out of that run)')
  with open(json_path) as f:
    return json.load(f), np.load(npz_path)


def reread(run_dir: str, heldout: np.ndarray, parts: tuple[str, str]) -> dict[str, Any]:
  """An earlier run's frontier (its frontier.json and frontier_sims.npz) read with another
  partition of the same images: the choice is made on ``~heldout`` alone and every figure reported
  on ``heldout``; ``parts`` names the two parts in the table. No restoration runs; the grid,
  costs and timings are the run's."""
  return _reread(run_dir, *_saved(run_dir), heldout, parts)


def _reread(run_dir: str, old: dict[str, Any], saved, heldout, parts) -> dict[str, Any]:
  """``reread`` of a run already loaded (``_saved``)."""
  if heldout.shape != saved['heldout'].shape:
    raise errors.UserError(
      f'{os.path.join(run_dir, "frontier_sims.npz")}: {len(saved["heldout"])} images, the new '
      f'partition has {len(heldout)}'
    )
  grid, sims_of, nfe_of, seconds_of = [], {}, {}, {}
  for i, label in enumerate(str(x) for x in saved['settings']):
    pts = sorted((p for p in old['points'] if p['setting'] == label), key=lambda p: p['k'])
    sims_of[label] = saved[f'sims_{i}']
    k_max = sims_of[label].shape[1]
    nfe_of[label] = pts[0]['model_calls'] // pts[0]['k']
    seconds_of[label] = pts[0]['seconds_per_image'] * k_max / pts[0]['k']
    grid.append((label, pts[0]['overrides'], k_max))
  new = figures(
    grid, sims_of, nfe_of, seconds_of, saved['is_member'], heldout, float(old['tolerance'])
  )
  doc = {'target': old['target'], 'step': old['step'], 'protocol': old['protocol'], **new}
  return {**doc, 'parts': list(parts)}


def reread_fresh(config, run_dir: str, out_dir: str, seen: tuple[int, int]) -> dict[str, Any]:
  """The frontier of the run in ``run_dir`` with the choice made on every image an earlier run of
  the same config scored (its calibration part and the held-out images that
  ``--heldout_members/--heldout_nonmembers = seen`` drew), and every figure reported on the
  held-out images that earlier run never scored. Writes frontier_fresh.{json,md,png}."""
  old, saved = _saved(run_dir)
  _, _, earlier, _, earlier_heldout = sweep_lib.image_indices(config, out_dir, *seen)
  calibration = saved['indices'][~saved['heldout']]
  if not np.array_equal(np.sort(calibration), np.sort(earlier[~earlier_heldout])):
    raise errors.UserError(
      f'{run_dir}: its calibration images are not those of this config; re-read it with the '
      'config (and overrides) of its run'
    )
  fresh = saved['heldout'] & ~np.isin(saved['indices'], earlier[earlier_heldout])
  for name, flag in (('members', 1), ('non-members', 0)):
    if not (fresh & (saved['is_member'] == flag)).any():
      raise errors.UserError(f'{run_dir}: no held-out {name} that the earlier run did not score')
  doc = _reread(run_dir, old, saved, fresh, ('selection', 'fresh held-out'))
  doc['seen'] = {'heldout_members': seen[0], 'heldout_nonmembers': seen[1]}
  write(doc, out_dir, 'frontier_fresh')
  return doc


def format_table(doc: dict[str, Any]) -> str:
  """Markdown: every point, costliest first, then the reference and the choice."""
  sel, rep = doc.get('parts', PARTS)
  lines = [
    f'| RePaint setting | K | model calls / image | s / image | AUC {sel} | '
    f'AUC {rep} | {rep} AUC - RePaint published [95% CI] | TPR@1%FPR {rep} |',
    '|---|---|---|---|---|---|---|---|',
  ]
  ref, chosen = doc['reference'], doc['chosen']
  for p in sorted(doc['points'], key=lambda p: -p['model_calls']):
    mark = ' **(chosen)**' if p == chosen else (' (reference)' if p == ref else '')
    lines.append(
      f'| {p["setting"]}{mark} | {p["k"]} | {p["model_calls"]:,} | '
      f'{p["seconds_per_image"]:.3f} | {p["auc_calibration"]:.3f} | {p["auc_heldout"]:.3f} | '
      f'{p["delta_heldout"]:+.3f} [{p["delta_heldout_ci"][0]:+.3f}, '
      f'{p["delta_heldout_ci"][1]:+.3f}] | {100 * p["tpr_1pct_heldout"]:.1f}% |'
    )
  cal, held = doc['n_calibration'], doc['n_heldout']
  lines += [
    '',
    f'{sel[:1].upper() + sel[1:]} part: {cal["members"]} members, {cal["nonmembers"]} '
    f'non-members; {rep} part: {held["members"]} members, {held["nonmembers"]} non-members.',
    f'Chosen (the cheapest within {doc["tolerance"]} {sel} AUC of the reference, '
    f'{ref["setting"]}): '
    f'{chosen["setting"]}, K={chosen["k"]}, {chosen["model_calls"]:,} calls per image '
    f'({rep} AUC {chosen["auc_heldout"]:.3f} against {ref["auc_heldout"]:.3f}); '
    f'{doc["speedup_model_calls"]:.1f}x fewer model calls, {doc["speedup_seconds"]:.1f}x '
    'less time per image.',
  ]
  return '\n'.join(lines) + '\n'


def plot(doc: dict[str, Any], path: str) -> str:
  pts, reference, chosen = doc['points'], doc['reference'], doc['chosen']
  fig = plots.new_figure(7.0, 4.5)
  ax = fig.subplots()
  for k in sorted({p['k'] for p in pts}):
    sel = sorted((p for p in pts if p['k'] == k), key=lambda p: p['model_calls'])
    calls, aucs = [p['model_calls'] for p in sel], [p['auc_heldout'] for p in sel]
    ax.plot(calls, aucs, 'o-', label=f'K = {k}')
  ax.scatter(
    [reference['model_calls']],
    [reference['auc_heldout']],
    s=120,
    marker='s',
    facecolors='none',
    edgecolors='black',
    zorder=5,
    label="RePaint's published setting",
  )
  ax.scatter(
    [chosen['model_calls']],
    [chosen['auc_heldout']],
    s=160,
    marker='*',
    color='red',
    zorder=6,
    label=f'chosen (on the {doc.get("parts", PARTS)[0]} part)',
  )
  plots.auc_against_calls_axes(ax, "DRC's cost frontier (RePaint)")
  return plots.save_figure(fig, path)
