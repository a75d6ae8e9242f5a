"""The report's figures: ROC (linear and log), score histograms, DRC's agree plot, the power curve
of dataset inference, evidence panels and the target's samples beside their nearest members.

Matplotlib is imported lazily, with the Agg backend, and figures are built as
``matplotlib.figure.Figure`` objects (no pyplot global state); every PNG is written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drc_jax.audit import metrics as metrics_lib
from drc_jax.core import fileio

SCORE_PREFIX = 'score/'
# Evidence images are upscaled (nearest neighbour) so that their shorter side has at least this
# many pixels: a 28x28 image becomes 112x112.
MIN_PANEL_PIXELS = 112


def new_figure(width: float, height: float):
  """A matplotlib Figure drawn by the Agg backend, outside pyplot's figure registry."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def save_figure(fig, path: str) -> str:
  """Writes ``fig`` as a PNG (zlib level 1: about three times faster to encode than the default
  level 6, for files about a fifth larger)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', pil_kwargs={'compress_level': 1})
  fileio.atomic_write_bytes(path, buffer.getvalue())
  return path


def auc_against_calls_axes(ax, title: str) -> None:
  """The axes of a held-out AUC against model calls per image plot (log x, a chance line)."""
  ax.axhline(0.5, color='black', lw=0.8, ls=':', label='chance')
  ax.set_xscale('log')
  ax.set_xlabel('model calls per image')
  ax.set_ylabel('AUC (held-out)')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize='small')


def attack_names(table: Mapping[str, np.ndarray]) -> list[str]:
  """The attacks of a score table, in key order: ``score/drc`` -> ``drc``."""
  return [key[len(SCORE_PREFIX) :] for key in table if key.startswith(SCORE_PREFIX)]


def member_nonmember(table: Mapping[str, np.ndarray], values: np.ndarray):
  split = np.asarray(table['split'])
  return values[split == 1], values[split == 0]


def plot_roc(table: Mapping[str, np.ndarray], path: str, log_scale: bool = False) -> str:
  """Plots the exact ROC of every attack on one figure, with the chance diagonal.

  Args:
    table: the score table.
    path: where to write the PNG.
    log_scale: log axes on both FPR and TPR; zero rates are clipped to 1/N (FPR) and 1/P (TPR).

  Returns:
    ``path``.
  """
  fig = new_figure(5.5, 5.0)
  ax = fig.add_subplot()
  lowest = 1.0
  for attack in attack_names(table):
    members, nonmembers = member_nonmember(table, np.asarray(table[SCORE_PREFIX + attack]))
    fpr, tpr, _ = metrics_lib.roc_curve(members, nonmembers)
    area = metrics_lib.auc(members, nonmembers)
    if log_scale:
      fpr, tpr = np.maximum(fpr, 1 / nonmembers.size), np.maximum(tpr, 1 / members.size)
      lowest = min(lowest, 1 / nonmembers.size, 1 / members.size)
    ax.plot(fpr, tpr, label=f'{attack} (AUC {area:.3f})', linewidth=1.5)
  if log_scale:
    ax.plot([lowest, 1], [lowest, 1], 'k--', linewidth=0.8, label='chance')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlim(lowest, 1)
    ax.set_ylim(lowest, 1.05)
  else:
    ax.plot([0, 1], [0, 1], 'k--', linewidth=0.8, label='chance')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
  ax.set_xlabel('false positive rate')
  ax.set_ylabel('true positive rate')
  ax.set_title('ROC (log scale)' if log_scale else 'ROC')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(loc='lower right', fontsize='small')
  return save_figure(fig, path)


def plot_histograms(table: Mapping[str, np.ndarray], path: str) -> str:
  """Member vs non-member score histograms (densities on shared bins), one subplot per attack."""
  attacks = attack_names(table)
  num_cols = min(3, max(1, len(attacks)))
  num_rows = max(1, math.ceil(len(attacks) / num_cols))
  fig = new_figure(4.0 * num_cols, 3.0 * num_rows)
  for i, attack in enumerate(attacks):
    ax = fig.add_subplot(num_rows, num_cols, i + 1)
    scores = np.asarray(table[SCORE_PREFIX + attack], dtype=np.float64)
    members, nonmembers = member_nonmember(table, scores)
    bins = np.histogram_bin_edges(scores[np.isfinite(scores)], bins=50)
    # one filled outline per histogram, not one rectangle per bin (800 patches to lay out)
    ax.hist(
      nonmembers,
      bins=bins,
      density=True,
      alpha=0.55,
      histtype='stepfilled',
      label=f'non-members ({nonmembers.size})',
    )
    ax.hist(
      members,
      bins=bins,
      density=True,
      alpha=0.55,
      histtype='stepfilled',
      label=f'members ({members.size})',
    )
    ax.set_title(attack)
    ax.set_xlabel('score (higher = member)')
    ax.legend(fontsize='x-small')
  return save_figure(fig, path)


def agree_chance_precision(agree: Mapping[str, Any]) -> float | None:
  """Precision of guessing: the share of members among the audited images (None: counts
  unknown)."""
  n_m, n_n = agree.get('n_members'), agree.get('n_nonmembers')
  return None if not n_m or n_n is None else n_m / (n_m + n_n)


def plot_agree(agree: Mapping[str, Sequence[Any]], path: str) -> str:
  """Precision and recall against the agree number (from ``metrics.agree_curve``).

  Undefined precision (None: nothing predicted member) is left out of the curve. The dashed line
  is the precision of guessing (the share of members), when ``agree`` has the counts.
  """
  agree_numbers = np.asarray(agree['agree'])
  precision = np.array([np.nan if p is None else p for p in agree['precision']], dtype=np.float64)
  recall = np.asarray(agree['recall'], dtype=np.float64)
  fig = new_figure(5.0, 3.8)
  ax = fig.add_subplot()
  ax.plot(agree_numbers, precision, 'o-', label='precision')
  ax.plot(agree_numbers, recall, 's-', label='recall')
  chance = agree_chance_precision(agree)
  if chance is not None:
    ax.axhline(
      chance,
      color='k',
      linestyle='--',
      linewidth=0.8,
      label=f'chance precision ({100 * chance:.1f}% members)',
    )
  ax.set_xticks(agree_numbers)
  ax.set_ylim(0, 1.05)
  ax.set_xlabel('agree number (votes needed to call "member")')
  ax.set_title('DRC votes: precision and recall')
  ax.grid(True, alpha=0.3)
  ax.legend()
  return save_figure(fig, path)


def plot_power_curve(power: Mapping[str, Any], path: str, suspect_size: int | None = None) -> str:
  """Dataset inference's rejection rates against the suspect-set size (``dataset.json`` power).

  The combined test on member sets (true-positive rate) and on non-member sets (false-positive
  rate) with their 95% intervals as error bars, each attack's member rate as a thin line, and
  alpha as a dashed line; the x-axis is ticked at the sizes tried, and ``suspect_size`` (the
  user's set) is marked with a vertical line.
  """
  fig = new_figure(6.0, 4.2)
  ax = fig.add_subplot()
  for kind, label, marker in (
    ('members', 'member sets (TPR)', 'o-'),
    ('nonmembers', 'non-member sets (FPR)', 's-'),
  ):
    entry = power[kind]
    sizes = np.asarray(entry['sizes'], dtype=np.float64)
    if not sizes.size:
      continue
    rate = np.asarray(entry['combined']['rate'], dtype=np.float64)
    ci = np.asarray(entry['combined']['ci95'], dtype=np.float64).reshape(-1, 2)
    ax.errorbar(
      sizes,
      rate,
      yerr=[rate - ci[:, 0], ci[:, 1] - rate],
      fmt=marker,
      capsize=3,
      label=f'combined, {label}',
    )
    if kind == 'members':
      for name in entry:
        if name in ('sizes', 'skipped_sizes', 'combined', 'within_alpha'):
          continue
        ax.plot(sizes, entry[name]['rate'], linewidth=0.8, alpha=0.6, label=f'{name} (TPR)')
  ax.axhline(
    float(power['alpha']),
    color='k',
    linestyle='--',
    linewidth=0.8,
    label=f'alpha = {float(power["alpha"]):g}',
  )
  ax.set_xscale('log')
  ticks = sorted({int(n) for kind in ('members', 'nonmembers') for n in power[kind]['sizes']})
  if suspect_size:
    ax.axvline(
      int(suspect_size), color='tab:red', linewidth=1.2, label=f'your set: {int(suspect_size)}'
    )
    ticks = sorted(set(ticks) | {int(suspect_size)})
  if ticks:
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel('suspect set size')
  ax.set_ylabel(f'fraction of sets with p < alpha ({power["repetitions"]} per size)')
  ax.set_title('Dataset inference: power and false-positive rate')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize='x-small')
  return save_figure(fig, path)


def display_image(image: Any, name: str) -> np.ndarray:
  """[-1, 1] image [H, W(, C)] -> [0, 1] float [H', W', C] upscaled by nearest neighbour."""
  image = np.asarray(image, dtype=np.float64)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'{name} must be [H, W, C] with C = 1 or 3, got shape {image.shape}')
  factor = max(1, math.ceil(MIN_PANEL_PIXELS / min(image.shape[:2])))
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  return np.clip((image + 1) / 2, 0, 1)


def split_name(split: Any) -> str:
  if isinstance(split, str):
    return split
  return 'member' if int(split) == 1 else 'non-member'


def percentile_text(percentile: float) -> str:
  """'above 87.5% of non-members' (and the ends in words), for a score's percentile."""
  p = float(percentile)
  if p >= 100.0:
    return 'above every non-member'
  if p <= 0.0:
    return 'below every non-member'
  return f'above {p:.1f}% of non-members'


def similarity_text(similarity: float, comparator: str | None) -> str:
  """A DRC similarity as its reader expects it: masked MSE as the error (the score is its
  negative), the other comparators as they are."""
  if comparator == 'masked_mse':
    return f'MSE {-float(similarity):.4g}'
  return f'{comparator or "similarity"} {float(similarity):.4g}'


def evidence_title(item: Mapping[str, Any]) -> str:
  return (
    f'{item["kind"]}: {split_name(item["split"])} #{item["index"]}, '
    f'{similarity_text(item["score"], item.get("comparator"))} (mean of K), '
    f'{percentile_text(item["percentile"])}, decision: {item["decision"]}'
  )


def evidence_panel(item: Mapping[str, Any], path: str) -> str:
  """Writes one evidence row: original | degraded | restored | |original - restored| heat map.

  Images are upscaled with nearest neighbour to at least ``MIN_PANEL_PIXELS`` on the shorter side.
  The heat map shows the channel mean of |original - restored| on the [0, 1] pixel scale, with a
  fixed colour range [0, 1] so panels are comparable with each other.

  Args:
    item: an evidence item (see the module docstring).
    path: where to write the PNG.

  Returns:
    ``path``.
  """
  images = {name: display_image(item[name], name) for name in ('original', 'degraded', 'restored')}
  shapes = {image.shape for image in images.values()}
  if len(shapes) != 1:
    raise ValueError(f'evidence images differ in shape: {sorted(shapes)}')
  difference = np.abs(images['original'] - images['restored']).mean(axis=-1)  # [H', W']
  restorations = item.get('restorations')
  thumbs = restorations is not None and len(restorations) > 1
  fig = new_figure(10.0, 5.0 if thumbs else 3.0)
  if thumbs:
    top, bottom = fig.subfigures(2, 1, height_ratios=(3.0, 2.0))
  else:
    top, bottom = fig, None
  axes = top.subplots(1, 4)
  for ax, (name, image) in zip(axes, images.items()):
    if image.shape[-1] == 1:
      ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
    else:
      ax.imshow(image, interpolation='nearest')
    ax.set_title(name)
  heat = axes[3].imshow(difference, cmap='magma', vmin=0, vmax=1, interpolation='nearest')
  axes[3].set_title('|original - restored|')
  fig.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.04)
  if 'shown_restoration' in item:
    axes[2].set_title(f'restored (#{item["shown_restoration"]}, the median one)')
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  if thumbs:
    sims = item.get('similarities') or [None] * len(restorations)
    small = bottom.subplots(1, len(restorations), squeeze=False)[0]
    for k, (ax, image) in enumerate(zip(small, restorations)):
      shown = display_image(image, 'restorations')
      if shown.shape[-1] == 1:
        ax.imshow(shown[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
      else:
        ax.imshow(shown, interpolation='nearest')
      ax.set_title(
        f'#{k}'
        + ('' if sims[k] is None else ': ' + similarity_text(sims[k], item.get('comparator'))),
        fontsize='small',
      )
      ax.set_xticks([])
      ax.set_yticks([])
    bottom.suptitle('all K restorations, each compared with the original', fontsize='small')
  fig.suptitle(evidence_title(item), fontsize='medium')
  return save_figure(fig, path)


def plot_samples(
  samples: np.ndarray,
  nearest: np.ndarray,
  distances: np.ndarray,
  is_copy: np.ndarray,
  nearest_index: np.ndarray,
  path: str,
  num: int = 24,
) -> str:
  """A grid of the target's samples, each above its nearest member (RMS distance in the title).

  Near-copies of a member are titled in red. Shows the first ``num`` samples.
  """
  num = min(num, len(samples))
  cols = min(8, num)
  rows = -(-num // cols)
  fig = new_figure(1.4 * cols, 3.0 * rows)
  axes = np.asarray(fig.subplots(2 * rows, cols, squeeze=False))
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_axis_off()
  for i in range(num):
    r, c = divmod(i, cols)
    for j, (image, title) in enumerate(
      (
        (samples[i], f'sample {i}'),
        (nearest[i], f'member #{int(nearest_index[i])}\nRMS {float(distances[i]):.3f}'),
      )
    ):
      ax = axes[2 * r + j, c]
      shown = display_image(image, 'sample')
      if shown.shape[-1] == 1:
        ax.imshow(shown[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
      else:
        ax.imshow(shown, interpolation='nearest')
      ax.set_title(title, fontsize='x-small', color='red' if j and is_copy[i] else 'black')
  fig.suptitle(
    'target samples (top) and their nearest members (below); red = near-copy', fontsize='medium'
  )
  return save_figure(fig, path)
