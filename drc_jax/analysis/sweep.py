"""DRC's protocol chosen by measurement: a sweep over restorers, masks, K, comparators, votes.

A benchmark, not a test. It restores every image of a fixed image set once per restoration
setting (restorer, steps, mask kind and ratio, inversion; K_max restorations each, with the audit's
own per-image keys, so the chosen setting's restorations are exactly what the audit computes),
then scores them with every comparator, every way of turning K similarities into one score
(mean, median, mean of logs, the agree number) and K = 1, 2, ..., K_max. Nothing is tuned on what is
reported:

* images are split by ``metrics.calibration_split`` (the audit's own calibration part,
  ``audit.calibration_fraction`` of each set, seed ``config.seed``); the sweep may restrict the
  held-out part to a random subset to save time, never the calibration part;
* a setting is SELECTED on the calibration part only (the best calibration AUC, then the cheapest
  setting within ``--tolerance`` of it), and every AUC in the table that is not labelled
  "calibration" is measured on the held-out part.

    python -m drc_jax.analysis sweep --config=configs/fashion_mnist.py --out=runs/sweep

writes ``sweep.json`` (every row), ``sweep.md`` (the table) and ``sweep.png`` (held-out AUC
against model calls per image, log scale).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import plots
from drc_jax.core import fileio, progress, protocol, streams
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib
from drc_jax.drc import compare as compare_lib
from drc_jax.drc import scorer as drc_lib
from drc_jax.targets import checkpoints, shipped
from drc_jax.targets import load as target_lib

# Restoration settings: (label, drc overrides, K_max). Cheap DDIM settings get K_max = 8, costly
# RePaint settings K_max = 2.
GRID: list[tuple[str, dict[str, Any], int]] = [
  (
    'ddim T=1000 25 steps, centre box 0.5',
    dict(restorer='ddim', t_start=1000, steps=25, mask='center_box', mask_ratio=0.5),
    4,
  ),
  (
    'ddim t=500 10 steps, centre box 0.5',
    dict(restorer='ddim', t_start=500, steps=10, mask='center_box', mask_ratio=0.5),
    4,
  ),
  (
    'ddim t=200 10 steps, centre box 0.25',
    dict(restorer='ddim', t_start=200, steps=10, mask='center_box', mask_ratio=0.25),
    8,
  ),
  (
    'ddim t=100 5 steps, patches 0.25',
    dict(restorer='ddim', t_start=100, steps=5, mask='random_patches', mask_ratio=0.25),
    8,
  ),
  (
    'ddim t=200 10 steps, patches 0.25',
    dict(restorer='ddim', t_start=200, steps=10, mask='random_patches', mask_ratio=0.25),
    8,
  ),
  (
    'ddim t=300 10 steps, patches 0.5',
    dict(restorer='ddim', t_start=300, steps=10, mask='random_patches', mask_ratio=0.5),
    8,
  ),
  (
    'ddim T=1000 25 steps, patches 0.25',
    dict(restorer='ddim', t_start=1000, steps=25, mask='random_patches', mask_ratio=0.25),
    4,
  ),
  (
    'ddnm T=1000 25 steps, patches 0.25',
    dict(restorer='ddnm', t_start=1000, steps=25, mask='random_patches', mask_ratio=0.25),
    4,
  ),
  (
    'repaint 50 steps no jumps, patches 0.25',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=1,
      jump_n_sample=1,
      mask='random_patches',
      mask_ratio=0.25,
    ),
    4,
  ),
  (
    'repaint 25 steps jump 5x2, patches 0.25',
    dict(
      restorer='repaint',
      steps=25,
      jump_length=5,
      jump_n_sample=2,
      mask='random_patches',
      mask_ratio=0.25,
    ),
    2,
  ),
  (
    'repaint 50 steps jump 10x2, patches 0.25',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=10,
      jump_n_sample=2,
      mask='random_patches',
      mask_ratio=0.25,
    ),
    2,
  ),
  (
    'repaint 50 steps jump 10x2, patches 0.5',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=10,
      jump_n_sample=2,
      mask='random_patches',
      mask_ratio=0.5,
    ),
    2,
  ),
  (
    'repaint 50 steps jump 10x2, centre box 0.5',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=10,
      jump_n_sample=2,
      mask='center_box',
      mask_ratio=0.5,
    ),
    2,
  ),
  # The foreground-saliency patch mask: the 4x4 patches that differ most from the border colour
  # (the garment, not the background; the encoder-free stand-in for the paper's DINO attention).
  (
    'ddim T=1000 25 steps, saliency patches 0.5',
    dict(restorer='ddim', t_start=1000, steps=25, mask='saliency_patches', mask_ratio=0.5),
    4,
  ),
  (
    "ddim T=1000 200 steps (the paper's restorer), saliency patches 0.5",
    dict(
      protocol.paper_restorer(), mask='saliency_patches', mask_ratio=protocol.PAPER['mask_ratio']
    ),
    2,
  ),
  (
    'repaint 50 steps jump 10x2, saliency patches 0.25',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=10,
      jump_n_sample=2,
      mask='saliency_patches',
      mask_ratio=0.25,
    ),
    2,
  ),
  (
    'repaint 50 steps jump 10x2, saliency patches 0.5',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=10,
      jump_n_sample=2,
      mask='saliency_patches',
      mask_ratio=0.5,
    ),
    2,
  ),
  (
    'repaint 50 steps jump 10x2, inverted centre box 0.25',
    dict(
      restorer='repaint',
      steps=50,
      jump_length=10,
      jump_n_sample=2,
      mask='center_box',
      mask_ratio=0.25,
      invert_mask=True,
    ),
    2,
  ),
]

# The value of a perfect match for each comparator (for 'logmean': -mean log(best - similarity)).
PERFECT = {'masked_mse': 0.0, 'ssim': 1.0, 'ssim_region': 1.0}


def aggregate(
  sims: np.ndarray, how: str, comparator: str, vote_threshold: float | None = None
) -> np.ndarray | None:
  """One score per image from its similarities [N, K] (higher = member); None if undefined.

  The audit's scoring rules ('mean', 'median', 'agree': the paper's agree number, how many of the K
  similarities exceed ``vote_threshold``; ``drc.aggregate``) and 'logmean' = -mean(log(perfect -
  sim)) (the geometric mean of the distances from a perfect match; not defined for psnr, already a
  log).
  """
  if how == 'logmean':
    if comparator not in PERFECT:
      return None
    return -np.mean(np.log(np.maximum(PERFECT[comparator] - sims, 1e-12)), axis=1)
  return drc_lib.aggregate(sims, how, vote_threshold)


AGGREGATIONS = ('mean', 'median', 'logmean', 'agree')


@dataclasses.dataclass
class Row:
  setting: str
  comparator: str
  aggregation: str
  k: int
  model_calls: int
  auc_calibration: float
  auc_heldout: float
  tpr_1pct_heldout: float
  overrides: dict


def score_rows(
  label: str,
  overrides: dict,
  nfe: int,
  sims_by_comparator: dict[str, np.ndarray],
  is_member: np.ndarray,
  heldout: np.ndarray,
  vote_quantile: float = 0.5,
) -> list[Row]:
  """Every (comparator, aggregation, K) row of one restoration setting ('agree' votes at the
  ``vote_quantile`` quantile of the calibration non-members' similarities, as the audit fits it)."""
  rows = []
  cal = ~heldout
  for comp, sims in sims_by_comparator.items():  # sims [N, K_max]
    for k in range(1, sims.shape[1] + 1):
      if k & (k - 1):  # K = 1, 2, 4, 8, ...
        continue
      s_k = sims[:, :k]
      # The vote threshold comes from the calibration non-members only.
      thr = drc_lib.vote_threshold(s_k[cal & (is_member == 0)], vote_quantile)
      for how in AGGREGATIONS:
        if k == 1 and how != 'mean':
          continue  # every aggregation of one similarity ranks like the similarity itself
        score = aggregate(s_k, how, comp, thr)
        if score is None:
          continue
        rows.append(
          Row(label, comp, how, k, k * nfe, *split_figures(score, is_member, heldout), overrides)
        )
  return rows


def split_figures(
  score: np.ndarray, is_member: np.ndarray, heldout: np.ndarray
) -> tuple[float, float, float]:
  """(AUC on the calibration part, AUC on the held-out part, held-out TPR at 1% FPR) of one
  score per image."""
  m, n = score[is_member == 1], score[is_member == 0]
  hm, hn = heldout[is_member == 1], heldout[is_member == 0]
  fpr, tpr, _ = metrics_lib.roc_curve(m[hm], n[hn])
  return (
    metrics_lib.auc(m[~hm], n[~hn]),
    metrics_lib.auc(m[hm], n[hn]),
    metrics_lib.tpr_at_fpr(fpr, tpr, 0.01),
  )


def part_counts(is_member: np.ndarray, heldout: np.ndarray) -> dict[str, dict[str, int]]:
  """Members and non-members in the calibration (``~heldout``) and held-out parts."""
  member = is_member == 1
  return {
    'n_calibration': {
      'members': int((~heldout & member).sum()),
      'nonmembers': int((~heldout & ~member).sum()),
    },
    'n_heldout': {
      'members': int((heldout & member).sum()),
      'nonmembers': int((heldout & ~member).sum()),
    },
  }


def select(rows: list[Row], tolerance: float) -> tuple[Row, Row]:
  """(best by calibration AUC, cheapest within ``tolerance`` of it by calibration AUC).

  Ties in cost go to the higher calibration AUC. Held-out figures play no part.
  """
  best = max(rows, key=lambda r: (r.auc_calibration, -r.model_calls))
  ok = [r for r in rows if r.auc_calibration >= best.auc_calibration - tolerance]
  chosen = min(ok, key=lambda r: (r.model_calls, -r.auc_calibration))
  return best, chosen


def restore_all(
  config,
  target,
  images: np.ndarray,
  indices: np.ndarray,
  overrides: dict,
  k_max: int,
  batch_size: int,
) -> tuple[dict[str, np.ndarray], int]:
  """Similarities [N, k_max] per comparator of one setting, and the model calls per restoration."""
  cfg = ml_collections.ConfigDict(config.drc.to_dict())
  cfg.update(overrides)
  cfg.num_restorations = k_max
  scorer = drc_lib.make_drc(cfg, target.model, target.schedule)
  # the setting's restorations: a line before they compile (the comparators compile in moments)
  evidence = progress.announce_compiles(jax.jit(scorer.evidence), 'DRC restorations', batch_arg=2)
  degradation = jax.jit(scorer.degradation, static_argnums=2)
  comparators: dict[str, Callable] = {
    n: jax.jit(compare_lib.get(n)) for n in compare_lib.COMPARATORS
  }
  out = {n: [] for n in comparators}
  for lo in range(0, len(images), batch_size):
    idx = np.resize(indices[lo : lo + batch_size], batch_size)  # pad: one compiled shape
    x = jnp.asarray(np.resize(images[lo : lo + batch_size], (batch_size,) + images.shape[1:]))
    keys = drc_lib.image_keys(config.seed, streams.ATTACKS['drc'], idx)
    _, restored = evidence(target.params, keys, x)  # [B, K, H, W, C]
    valid = min(batch_size, len(images) - lo)
    for name, fn in comparators.items():
      per_k = [np.asarray(fn(x, restored[:, k], degradation(keys, x, k))) for k in range(k_max)]
      out[name].append(np.stack(per_k, axis=1)[:valid])
  return {n: np.concatenate(v) for n, v in out.items()}, scorer.restorer.nfe


def image_indices(
  config, split_dir: str, heldout_members: int, heldout_nonmembers: int
) -> tuple[Any, Any, np.ndarray, np.ndarray, np.ndarray]:
  """(source, split, dataset indices, is_member, heldout) of the images a sweep scores: every image
  of the audit's calibration part (``metrics.calibration_split``) and at most ``heldout_members`` /
  ``heldout_nonmembers`` random held-out ones (0 = all). A function of the config alone."""
  source = splits_lib.run_source(config)
  split = splits_lib.resolve(config.split, source, split_dir, write=False)
  mem_held, non_held = metrics_lib.calibration_split(
    len(split.members),
    len(split.nonmembers),
    fraction=config.audit.calibration_fraction,
    seed=config.seed,
  )
  rng = np.random.default_rng([config.seed, streams.HOST_SWEEP_HELDOUT])

  def subset(held: np.ndarray, limit: int) -> np.ndarray:
    """Keep all calibration positions and at most ``limit`` random held-out ones."""
    keep = ~held
    pos = np.flatnonzero(held)
    if limit and limit < len(pos):
      pos = rng.choice(pos, limit, replace=False)
    keep[pos] = True
    return keep

  keep_m, keep_n = subset(mem_held, heldout_members), subset(non_held, heldout_nonmembers)
  indices = np.concatenate([split.members[keep_m], split.nonmembers[keep_n]])
  is_member = np.concatenate([np.ones(keep_m.sum(), np.int8), np.zeros(keep_n.sum(), np.int8)])
  heldout = np.concatenate([mem_held[keep_m], non_held[keep_n]])
  return source, split, indices, is_member, heldout


def image_set(
  config, target_path: str, out_dir: str, heldout_members: int, heldout_nonmembers: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(target, images, split indices, is_member, heldout): the images a sweep scores
  (``image_indices``), loaded; checks that the target was trained on the config's members."""
  source, split, indices, is_member, heldout = image_indices(
    config, out_dir, heldout_members, heldout_nonmembers
  )
  target = target_lib.load_target(target_path)
  workdir = checkpoints.workdir_of(shipped.resolve(target_path))
  splits_lib.check_trained_on(
    checkpoints.trained_on(workdir),
    splits_lib.training_data(config, source, split),
    str(workdir / checkpoints.MODEL_JSON),
  )
  images, _, _ = data_lib.load_images(source, indices, config.data)
  logging.info(
    'sweep on %d images: %d calibration (%d members), %d held-out (%d members)',
    len(indices),
    int((~heldout).sum()),
    int((~heldout & (is_member == 1)).sum()),
    int(heldout.sum()),
    int((heldout & (is_member == 1)).sum()),
  )
  return target, images, indices, is_member, heldout


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
  """Runs the sweep; writes sweep.json, sweep.md and sweep.png into ``out_dir``."""
  grid = GRID if grid is None else grid
  target, images, indices, is_member, heldout = image_set(
    config, target_path, out_dir, heldout_members, heldout_nonmembers
  )
  rows: list[Row] = []
  timings = {}
  for label, overrides, k_max in grid:
    t0 = time.time()
    sims, nfe = restore_all(config, target, images, indices, overrides, k_max, batch_size)
    timings[label] = time.time() - t0
    new = score_rows(
      label, overrides, nfe, sims, is_member, heldout, float(config.drc.vote_quantile)
    )
    rows += new
    top = max(new, key=lambda r: r.auc_calibration)
    logging.info(
      '%-55s %4d calls/restoration, %.0fs; best calibration AUC %.3f (%s, %s, K=%d)',
      label,
      nfe,
      timings[label],
      top.auc_calibration,
      top.comparator,
      top.aggregation,
      top.k,
    )
  best, chosen = select(rows, tolerance)
  doc = {
    'target': target_path,
    'step': target.step,
    'tolerance': tolerance,
    **part_counts(is_member, heldout),
    'best': dataclasses.asdict(best),
    'chosen': dataclasses.asdict(chosen),
    'seconds_per_setting': timings,
    'rows': [dataclasses.asdict(r) for r in rows],
  }
  os.makedirs(out_dir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(out_dir, 'sweep.json'), json.dumps(doc, indent=1))
  fileio.atomic_write_text(os.path.join(out_dir, 'sweep.md'), format_table(rows, best, chosen))
  plot(rows, best, chosen, os.path.join(out_dir, 'sweep.png'))
  return doc


def _frontier(rows: list[Row]) -> list[Row]:
  """Per restoration setting, its row with the best calibration AUC."""
  by_setting: dict[str, Row] = {}
  for r in rows:
    if r.setting not in by_setting or r.auc_calibration > by_setting[r.setting].auc_calibration:
      by_setting[r.setting] = r
  return sorted(by_setting.values(), key=lambda r: r.model_calls)


def format_table(rows: list[Row], best: Row, chosen: Row) -> str:
  """Markdown: per setting its best (by calibration) comparator/aggregation/K, then the choice."""
  lines = [
    '| restoration setting | comparator | aggregation | K | model calls / image | '
    'AUC calibration | AUC held-out | TPR@1%FPR held-out |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in _frontier(rows):
    mark = ' **(chosen)**' if r == chosen else (' (best)' if r == best else '')
    lines.append(
      f'| {r.setting}{mark} | {r.comparator} | {r.aggregation} | {r.k} | '
      f'{r.model_calls} | {r.auc_calibration:.3f} | {r.auc_heldout:.3f} | '
      f'{100 * r.tpr_1pct_heldout:.1f}% |'
    )
  lines.append('')
  lines.append(
    f'Best by calibration AUC: {best.setting}, {best.comparator}, {best.aggregation}, '
    f'K={best.k} ({best.model_calls} calls; calibration {best.auc_calibration:.3f}, '
    f'held-out {best.auc_heldout:.3f}).'
  )
  lines.append(
    f'Chosen (cheapest within the tolerance of the best, on calibration): '
    f'{chosen.setting}, {chosen.comparator}, {chosen.aggregation}, K={chosen.k} '
    f'({chosen.model_calls} calls; calibration {chosen.auc_calibration:.3f}, held-out '
    f'{chosen.auc_heldout:.3f}).'
  )
  return '\n'.join(lines) + '\n'


def plot(rows: list[Row], best: Row, chosen: Row, path: str) -> str:
  fig = plots.new_figure(7.0, 4.5)
  ax = fig.subplots()
  ax.scatter(
    [r.model_calls for r in rows],
    [r.auc_heldout for r in rows],
    s=6,
    alpha=0.25,
    color='grey',
    label='every comparator / aggregation / K',
  )
  front = _frontier(rows)
  ax.plot(
    [r.model_calls for r in front],
    [r.auc_heldout for r in front],
    'o-',
    label='per setting: best on calibration',
  )
  ax.scatter(
    [chosen.model_calls],
    [chosen.auc_heldout],
    s=120,
    marker='*',
    color='red',
    zorder=5,
    label='chosen',
  )
  plots.auc_against_calls_axes(ax, 'DRC: AUC against cost')
  return plots.save_figure(fig, path)
