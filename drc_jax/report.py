"""Audit report: ROC and histogram plots, evidence panels, and one self-contained HTML page.

Inputs are host-side NumPy data produced by the audit:

- a score table ``dict[str, np.ndarray]`` with ``split`` (int8 [N], 1 = member, 0 = non-member),
  ``index`` (int64 [N]), ``hash`` (str [N], hex SHA-256 of the image bytes), ``label`` (int64 [N]),
  one ``score/<attack>`` (float64 [N], higher = member) per attack, and optionally ``drc/sim``
  (float64 [N, K]) and ``drc/votes`` (int [N]);
- per-attack metrics ``dict[attack, dict]`` from ``metrics.attack_metrics``, optionally with a
  ``calibrated`` sub-dict from ``metrics.calibrate`` and ``nfe_per_image``;
- evidence items: dicts with ``kind``, ``index``, ``split``, ``score``, ``percentile`` (among
  non-members), ``decision`` and the ``original``, ``degraded`` and ``restored`` images (float
  [H, W, C] in [-1, 1], C = 1 or 3).

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), so
a crash never leaves a half-written PNG or HTML behind. Matplotlib is imported lazily, with the Agg
backend, and figures are built as ``matplotlib.figure.Figure`` objects (no pyplot global state).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from drc_jax import fileio
from drc_jax import metrics as metrics_lib

SCORE_PREFIX = 'score/'
# Order of the evidence groups in the HTML; other kinds follow in order of appearance.
EVIDENCE_KINDS = ('highest', 'lowest', 'borderline')
# Evidence images are upscaled (nearest neighbour) so that their shorter side has at least this
# many pixels: a 28x28 image becomes 112x112.
MIN_PANEL_PIXELS = 112


def _new_figure(width: float, height: float):
  """A matplotlib Figure drawn by the Agg backend, outside pyplot's figure registry."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _write_atomic(path: str, data: bytes) -> None:
  """Atomic write on local disks and ``gs://`` (see ``drc_jax.fileio``)."""
  fileio.atomic_write_bytes(path, data)


def _save_figure(fig, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  _write_atomic(path, buffer.getvalue())
  return path


def attack_names(table: Mapping[str, np.ndarray]) -> list[str]:
  """The attacks of a score table, in key order: ``score/drc`` -> ``drc``."""
  return [key[len(SCORE_PREFIX) :] for key in table if key.startswith(SCORE_PREFIX)]


def _member_nonmember(table: Mapping[str, np.ndarray], values: np.ndarray):
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
  fig = _new_figure(5.5, 5.0)
  ax = fig.add_subplot()
  lowest = 1.0
  for attack in attack_names(table):
    members, nonmembers = _member_nonmember(table, np.asarray(table[SCORE_PREFIX + attack]))
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
  return _save_figure(fig, path)


def plot_histograms(table: Mapping[str, np.ndarray], path: str) -> str:
  """Member vs non-member score histograms (densities on shared bins), one subplot per attack."""
  attacks = attack_names(table)
  num_cols = min(3, max(1, len(attacks)))
  num_rows = max(1, math.ceil(len(attacks) / num_cols))
  fig = _new_figure(4.0 * num_cols, 3.0 * num_rows)
  for i, attack in enumerate(attacks):
    ax = fig.add_subplot(num_rows, num_cols, i + 1)
    scores = np.asarray(table[SCORE_PREFIX + attack], dtype=np.float64)
    members, nonmembers = _member_nonmember(table, scores)
    bins = np.histogram_bin_edges(scores[np.isfinite(scores)], bins=50)
    ax.hist(
      nonmembers, bins=bins, density=True, alpha=0.55, label=f'non-members ({nonmembers.size})'
    )
    ax.hist(members, bins=bins, density=True, alpha=0.55, label=f'members ({members.size})')
    ax.set_title(attack)
    ax.set_xlabel('score (higher = member)')
    ax.legend(fontsize='x-small')
  return _save_figure(fig, path)


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
  fig = _new_figure(5.0, 3.8)
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
  return _save_figure(fig, path)


def plot_power_curve(power: Mapping[str, Any], path: str) -> str:
  """Dataset inference's rejection rates against the suspect-set size (``dataset.json`` power).

  The combined test on member sets (true-positive rate) and on non-member sets (false-positive
  rate) with their 95% intervals as error bars, each attack's member rate as a thin line, and
  alpha as a dashed line.
  """
  fig = _new_figure(6.0, 4.2)
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
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel('suspect set size')
  ax.set_ylabel(f'fraction of sets with p < alpha ({power["repetitions"]} per size)')
  ax.set_title('Dataset inference: power and false-positive rate')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize='x-small')
  return _save_figure(fig, path)


def _display_image(image: Any, name: str) -> np.ndarray:
  """[-1, 1] image [H, W(, C)] -> [0, 1] float [H', W', C] upscaled by nearest neighbour."""
  image = np.asarray(image, dtype=np.float64)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'{name} must be [H, W, C] with C = 1 or 3, got shape {image.shape}')
  factor = max(1, math.ceil(MIN_PANEL_PIXELS / min(image.shape[:2])))
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  return np.clip((image + 1) / 2, 0, 1)


def _split_name(split: Any) -> str:
  if isinstance(split, str):
    return split
  return 'member' if int(split) == 1 else 'non-member'


def _evidence_title(item: Mapping[str, Any]) -> str:
  return (
    f'{item["kind"]}: {_split_name(item["split"])} #{item["index"]}, '
    f'score {float(item["score"]):.4g}, {float(item["percentile"]):.1f}th percentile among '
    f'non-members, decision: {item["decision"]}'
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
  images = {name: _display_image(item[name], name) for name in ('original', 'degraded', 'restored')}
  shapes = {image.shape for image in images.values()}
  if len(shapes) != 1:
    raise ValueError(f'evidence images differ in shape: {sorted(shapes)}')
  difference = np.abs(images['original'] - images['restored']).mean(axis=-1)  # [H', W']
  restorations = item.get('restorations')
  thumbs = restorations is not None and len(restorations) > 1
  fig = _new_figure(10.0, 5.0 if thumbs else 3.0)
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
    axes[2].set_title(f'restored (#{item["shown_restoration"]}, median similarity)')
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  if thumbs:
    sims = item.get('similarities') or [None] * len(restorations)
    small = bottom.subplots(1, len(restorations), squeeze=False)[0]
    for k, (ax, image) in enumerate(zip(small, restorations)):
      shown = _display_image(image, 'restorations')
      if shown.shape[-1] == 1:
        ax.imshow(shown[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
      else:
        ax.imshow(shown, interpolation='nearest')
      ax.set_title(
        f'#{k}' + ('' if sims[k] is None else f': {float(sims[k]):.4g}'), fontsize='small'
      )
      ax.set_xticks([])
      ax.set_yticks([])
    bottom.suptitle('all K restorations (similarity to the original)', fontsize='small')
  fig.suptitle(_evidence_title(item), fontsize='medium')
  return _save_figure(fig, path)


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
  fig = _new_figure(1.4 * cols, 3.0 * rows)
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
      shown = _display_image(image, 'sample')
      if shown.shape[-1] == 1:
        ax.imshow(shown[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
      else:
        ax.imshow(shown, interpolation='nearest')
      ax.set_title(title, fontsize='x-small', color='red' if j and is_copy[i] else 'black')
  fig.suptitle(
    'target samples (top) and their nearest members (below); red = near-copy', fontsize='medium'
  )
  return _save_figure(fig, path)


def _samples_html(figures: Mapping[str, Any]) -> str:
  rows = [
    ('samples (deterministic DDIM, 50 steps)', f'{figures["num_samples"]}'),
    ('k-NN precision (samples that look like data)', f'{figures["precision"]:.3f}'),
    ('k-NN recall (data the samples cover)', f'{figures["recall"]:.3f}'),
    ('near-copies of members', f'{figures["near_copy_fraction"]:.1%}'),
    ('noise textures (rougher than 99% of real images)', f'{figures["noise_fraction"]:.1%}'),
    (
      'median RMS distance, sample to nearest member',
      f'{figures["median_nn_member_distance_samples"]:.4f}',
    ),
    (
      'median RMS distance, real non-member to nearest member',
      f'{figures["median_nn_member_distance_nonmembers"]:.4f}',
    ),
  ]
  body = ''.join(f'<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>' for a, b in rows)
  out = f'<table>{body}</table>'
  for w in figures.get('warnings', ()):
    out += f'<p class="warn">Warning: {html.escape(w)}</p>'
  return out


def _agree_from_table(table: Mapping[str, np.ndarray]) -> dict[str, list] | None:
  """The agree curve from ``drc/votes``, with K from ``drc/sim``; None when either is missing."""
  if 'drc/votes' not in table or 'drc/sim' not in table:
    return None
  members, nonmembers = _member_nonmember(table, np.asarray(table['drc/votes']))
  return metrics_lib.agree_curve(members, nonmembers, k=int(np.asarray(table['drc/sim']).shape[1]))


def _tpr_columns(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
  """(metric key, label) of every TPR@FPR in ``metrics``: tpr_at_0p1pct_fpr -> 'TPR@0.1%FPR'."""
  columns = []
  for per_attack in metrics.values():
    for key in per_attack:
      match = re.fullmatch(r'tpr_at_(.+)pct_fpr', key)
      if match and key not in [c[0] for c in columns]:
        columns.append((key, f'TPR@{match.group(1).replace("p", ".")}%FPR'))
  return columns


def _fmt(value: Any, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(float(value), spec)


def _fmt_percent(value: Any, missing: str = '-') -> str:
  return missing if value is None else f'{100 * float(value):.2f}%'


def _fmt_interval(interval: Sequence[float] | None, percent: bool) -> str:
  if interval is None:
    return ''
  lo, hi = interval
  return f' [{_fmt_percent(lo)}, {_fmt_percent(hi)}]' if percent else f' [{lo:.3f}, {hi:.3f}]'


def _fmt_nfe(value: Any) -> str:
  return '-' if value is None else f'{float(value):g}'


def format_metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """A plain-text table for the terminal: attack, AUC, ASR, TPR@FPR columns (each with its 95%
  interval when known), NFE; then each warning once, with the attacks it concerns."""
  tpr_columns = _tpr_columns(metrics)
  header = ['attack', 'AUC [95% CI]', 'ASR [95% CI]'] + [
    label.replace('FPR', '') + ' [95% CI]' for _, label in tpr_columns
  ]
  header.append('NFE')
  rows = [header]
  for attack, m in metrics.items():
    ci = m.get('ci95', {})
    rows.append(
      [
        attack,
        _fmt(m.get('auc'), '.4f') + _fmt_interval(ci.get('auc'), False),
        _fmt(m.get('asr'), '.4f') + _fmt_interval(ci.get('asr'), False),
      ]
      + [_fmt_percent(m.get(key)) + _fmt_interval(ci.get(key), True) for key, _ in tpr_columns]
      + [_fmt_nfe(m.get('nfe_per_image'))]
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = [
    '  '.join(
      cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
    ).rstrip()
    for row in rows
  ]
  lines.insert(1, '  '.join('-' * w for w in widths))
  notes: dict[str, list[str]] = {}  # the same warning for every attack is printed once
  for attack, m in metrics.items():
    for warning in m.get('warnings', ()):
      notes.setdefault(warning, []).append(attack)
  for warning, attacks in notes.items():
    who = 'all attacks' if len(attacks) == len(metrics) > 1 else ', '.join(attacks)
    lines.append(f'note ({who}): {warning}')
  return '\n'.join(lines)


def _metrics_html(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """The HTML metrics table: one row per attack."""
  tpr_columns = _tpr_columns(metrics)
  calibrated = any('calibrated' in m for m in metrics.values())
  header = ['attack', 'AUC [95% CI]', 'ASR [95% CI]'] + [label for _, label in tpr_columns]
  header.append('model calls / image')
  if calibrated:
    header += [
      'calibrated threshold',
      'held-out TPR [95% CI]',
      'held-out FPR [95% CI]',
      'held-out accuracy [95% CI]',
      'held-out n (members / non-members)',
    ]
  header.append('warnings')
  rows = []
  for attack, m in metrics.items():
    ci = m.get('ci95', {})
    cells = [
      attack,
      _fmt(m.get('auc'), '.4f') + _fmt_interval(ci.get('auc'), percent=False),
      _fmt(m.get('asr'), '.4f') + _fmt_interval(ci.get('asr'), percent=False),
    ]
    cells += [
      _fmt_percent(m.get(key)) + _fmt_interval(ci.get(key), percent=True) for key, _ in tpr_columns
    ]
    cells.append(_fmt_nfe(m.get('nfe_per_image')))
    if calibrated:
      cal = m.get('calibrated', {})
      cal_ci = cal.get('ci95', {})
      n = (
        f'{cal["n_members"]} / {cal["n_nonmembers"]}'
        if 'n_members' in cal and 'n_nonmembers' in cal
        else '-'
      )
      cells += [
        _fmt(cal.get('threshold'), '.6g'),
        _fmt_percent(cal.get('tpr')) + _fmt_interval(cal_ci.get('tpr'), True),
        _fmt_percent(cal.get('fpr')) + _fmt_interval(cal_ci.get('fpr'), True),
        _fmt(cal.get('accuracy'), '.4f') + _fmt_interval(cal_ci.get('accuracy'), False),
        n,
      ]
    cells.append('; '.join(m.get('warnings', ())))
    rows.append('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in cells) + '</tr>')
  head = '<tr>' + ''.join(f'<th>{html.escape(h)}</th>' for h in header) + '</tr>'
  return f'<table>\n{head}\n' + '\n'.join(rows) + '\n</table>'


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  head = '<tr>' + ''.join(f'<th>{html.escape(h)}</th>' for h in header) + '</tr>'
  body = ['<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in row) + '</tr>' for row in rows]
  return f'<table>\n{head}\n' + '\n'.join(body) + '\n</table>'


def _per_image_calibration_html(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """Raw vs calibrated held-out metrics per attack; '' when no attack has them."""
  rows = []
  for attack, m in metrics.items():
    cal = m.get('per_image_calibration')
    if not cal:
      continue
    row = [attack, f'{cal["n_members"]} / {cal["n_nonmembers"]}']
    for key, percent in (('auc', False), ('tpr_at_1pct_fpr', True), ('tpr_at_0p1pct_fpr', True)):
      raw, new, diff = cal['raw'][key], cal['calibrated'][key], cal['difference'][key]
      fmt = _fmt_percent if percent else (lambda v: _fmt(v, '.4f'))
      row += [
        fmt(raw),
        fmt(new) + _fmt_interval(cal['calibrated']['ci95'].get(key), percent),
        ('+' if diff >= 0 else '') + (f'{100 * diff:.2f} pts' if percent else f'{diff:.4f}'),
      ]
    row += [
      f'{_fmt_percent(cal["at_zero"]["tpr"])} / {_fmt_percent(cal["at_zero"]["fpr"])}',
      '; '.join(cal.get('warnings', ())),
    ]
    rows.append(row)
  if not rows:
    return ''
  first = next(
    m['per_image_calibration'] for m in metrics.values() if m.get('per_image_calibration')
  )
  header = [
    'attack',
    'held-out members / non-members',
    'AUC raw',
    'AUC calibrated',
    'difference',
    'TPR@1%FPR raw',
    'TPR@1%FPR calibrated',
    'difference',
    'TPR@0.1%FPR raw',
    'TPR@0.1%FPR calibrated',
    'difference',
    'calibrated > 0: TPR / FPR',
    'warnings',
  ]
  note = (
    f'<p class="note">Calibrated score = score minus the predicted '
    f"{first['quantile']:g} quantile of a non-member's score, from a linear quantile "
    f'regression (pinball loss, ridge {first["l2"]:g}) on image statistics '
    f'({html.escape(", ".join(first["features"]))}) fitted on '
    f'{first["fit"]["n_nonmembers"]} images: {html.escape(first["fit"]["images"])}. Every '
    f'number here, raw and calibrated, is computed on the same held-out images only.</p>'
  )
  return _html_table(header, rows) + '\n' + note


def _p_text(p: float) -> str:
  return f'{p:.3g}'


def _dataset_html(dataset: Mapping[str, Any], power_png: str | None) -> list[str]:
  """The dataset-inference section (``dataset.json`` of ``--mode=dataset``)."""
  sus, ref = dataset['suspect'], dataset['reference']
  parts = [
    '<h2>Dataset inference</h2>',
    f'<p><b>Verdict (combined test): {html.escape(dataset["verdict"])}</b>. Suspect set: '
    f'{html.escape(str(sus["source"]))}, {sus["n"]} images; reference: '
    f'{html.escape(str(ref["source"]))}, {ref["n_test"]} held-out images in the test '
    f'({ref["n_fit"]} fitted the combiner).</p>',
  ]
  rows = []
  for name, t in dataset['tests'].items():
    delta = t.get('glass_delta')
    rows.append(
      [
        name,
        f'{t["statistic"]:g}',
        _p_text(t['p_value']),
        t['method'],
        f'{t["auc"]:.3f}',
        f'{t["rank_biserial"]:.3f}',
        '-' if delta is None else f'{delta:.3f}',
        str(t['n_suspect']),
        str(t['n_reference']),
        'detected' if t['reject'] else 'no evidence',
      ]
    )
  parts.append(
    _html_table(
      [
        'test',
        'U',
        'p-value (one-sided)',
        'method',
        'AUC (P(suspect > reference))',
        'rank-biserial',
        "Glass's delta",
        'suspects',
        'references',
        f'at alpha = {dataset["alpha"]:g}',
      ],
      rows,
    )
  )
  comb = dataset['combiner']
  weights = ', '.join(f'{k} {v:+.3f}' for k, v in comb['weights'].items())
  parts.append(
    f'<p class="note">Combiner: {html.escape(comb["kind"])} regression (ridge '
    f'{comb["l2"]:g}) on standardized scores, weights {html.escape(weights)}; fitted on '
    f'{comb["fit"]["n_members"]} members and {comb["fit"]["n_nonmembers"]} non-members.'
    '</p>'
  )
  parts.append(
    '<ul class="note">'
    + ''.join(f'<li>{html.escape(v)}</li>' for v in dataset.get('validity', ()))
    + '</ul>'
  )
  power = dataset.get('power')
  if power:
    parts.append('<h3>Power curve</h3>')
    if power_png:
      parts.append(_img_tag(power_png, 'power curve'))
    sizes = sorted(set(power['members']['sizes']) | set(power['nonmembers']['sizes']))
    rows = []
    for n in sizes:
      row = [str(n)]
      for kind in ('members', 'nonmembers'):
        entry = power[kind]
        if n in entry['sizes']:
          i = entry['sizes'].index(n)
          row.append(
            _fmt_percent(entry['combined']['rate'][i])
            + _fmt_interval(entry['combined']['ci95'][i], percent=True)
          )
        else:
          row.append('-')
      within = power['nonmembers'].get('within_alpha', {}).get('combined', [])
      nonmember_sizes = power['nonmembers']['sizes']
      row.append(
        ('yes' if within[nonmember_sizes.index(n)] else 'NO') if n in nonmember_sizes else '-'
      )
      rows.append(row)
    parts.append(
      _html_table(
        [
          'suspect set size',
          'member sets: TPR [95% CI]',
          'non-member sets: FPR [95% CI]',
          'FPR <= alpha within its CI',
        ],
        rows,
      )
    )
    parts.append(
      f'<p class="note">{power["repetitions"]} random sets per size, drawn from '
      f'{power["pools"]["members"]} held-out members (tested against the held-out '
      f'reference) and from the {power["pools"]["reference"]} held-out references '
      f'(tested against the rest of them); {html.escape(power["interval"])} intervals '
      f'(the sets share one pool, so the intervals are approximate).</p>'
    )
  return parts


def _img_tag(png_path: str, alt: str) -> str:
  encoded = base64.b64encode(epath.Path(png_path).read_bytes()).decode('ascii')
  return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _evidence_caption(item: Mapping[str, Any], table: Mapping[str, np.ndarray]) -> str:
  """The panel title plus the image's label (its name when the item has ``label_name``) and
  hash prefix, looked up in the table."""
  caption = _evidence_title(item)
  if item.get('label_name'):
    caption += f', {item["label_name"]}'
  if 'index' in table and 'split' in table:
    split = 1 if _split_name(item['split']) == 'member' else 0
    rows = np.flatnonzero(
      (np.asarray(table['index']) == int(item['index'])) & (np.asarray(table['split']) == split)
    )
    if rows.size:
      if 'label' in table and not item.get('label_name'):
        caption += f', label {int(np.asarray(table["label"])[rows[0]])}'
      if 'hash' in table:
        caption += f', sha256 {str(np.asarray(table["hash"])[rows[0]])[:16]}'
  return caption


_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
td:first-child, td:last-child, th { text-align: left; }
pre { background: #f4f4f4; padding: 1em; overflow-x: auto; }
img { max-width: 100%; }
figure { margin: 1em 0; }
.note { color: #555; font-size: 0.9em; }
.warn { color: #b00; font-weight: bold; }
"""


def write_report(
  workdir: str,
  table: Mapping[str, np.ndarray],
  metrics: Mapping[str, Mapping[str, Any]],
  evidence: Sequence[Mapping[str, Any]],
  *,
  config_summary: str = '',
  agree: Mapping[str, Sequence[Any]] | None = None,
  samples: Mapping[str, Any] | None = None,
  dataset: Mapping[str, Any] | None = None,
) -> str:
  """Writes the plots into ``workdir/report/`` and one self-contained ``workdir/report.html``.

  The HTML embeds every image as a base64 data URI and needs no server or external resource.

  Args:
    workdir: the audit's working directory.
    table: the score table.
    metrics: attack name -> metrics (``metrics.attack_metrics`` output, optionally with
      ``calibrated`` and ``nfe_per_image``).
    evidence: evidence items, shown grouped by kind.
    config_summary: text shown in a <pre> block.
    agree: an ``agree_curve`` dict; if None it is computed from ``drc/votes`` and ``drc/sim`` when
      the table has both, else the agree plot is left out.
    samples: ``samples.load_or_generate`` output (the target's samples and their figures), or
      None to leave the section out.
    dataset: the ``dataset.json`` of ``--mode=dataset``, shown in a dataset-inference section.

  Returns:
    The path of ``report.html``.
  """
  report_dir = os.path.join(workdir, 'report')
  epath.Path(report_dir).mkdir(parents=True, exist_ok=True)
  plots = [
    ('ROC', plot_roc(table, os.path.join(report_dir, 'roc.png'), log_scale=False)),
    ('ROC, log scale', plot_roc(table, os.path.join(report_dir, 'roc_log.png'), log_scale=True)),
    ('Score histograms', plot_histograms(table, os.path.join(report_dir, 'histograms.png'))),
  ]
  if agree is None:
    agree = _agree_from_table(table)
  if agree is not None:
    plots.append(('DRC agree number', plot_agree(agree, os.path.join(report_dir, 'agree.png'))))

  kinds = list(EVIDENCE_KINDS) + [
    k for k in dict.fromkeys(str(e['kind']) for e in evidence) if k not in EVIDENCE_KINDS
  ]
  groups: dict[str, list[tuple[str, str]]] = {kind: [] for kind in kinds}
  for i, item in enumerate(evidence):
    safe_kind = re.sub(r'[^A-Za-z0-9_-]', '_', str(item['kind']))
    path = evidence_panel(item, os.path.join(report_dir, f'evidence_{i:03d}_{safe_kind}.png'))
    groups[str(item['kind'])].append((_evidence_caption(item, table), path))

  split = np.asarray(table['split'])
  parts = [
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
    '<title>Membership inference audit</title>',
    f'<style>{_CSS}</style>\n</head>\n<body>',
    '<h1>Membership inference audit</h1>',
    f'<p>{int((split == 1).sum())} members, {int((split == 0).sum())} non-members; attacks: '
    f'{html.escape(", ".join(attack_names(table)))}.</p>',
  ]
  if config_summary:
    parts += ['<h2>Configuration</h2>', f'<pre>{html.escape(config_summary)}</pre>']
  parts += [
    '<h2>Metrics</h2>',
    _metrics_html(metrics),
    '<p class="note">Higher score = member; an image is called a member iff score &gt;= '
    'threshold. TPR@f%FPR is the highest TPR whose FPR does not exceed f, without '
    'interpolation; with n non-members it rests on about n&middot;f false positives. '
    'Intervals are 95% percentile bootstraps resampling members and non-members '
    'separately.</p>',
  ]
  if samples is not None:
    grid = plot_samples(
      samples['samples'],
      samples['nearest'],
      samples['nearest_distance'],
      samples['is_copy'],
      samples['nearest_index'],
      os.path.join(report_dir, 'samples.png'),
    )
    parts += [
      "<h2>The target's own samples</h2>",
      _samples_html(samples['figures']),
      '<p class="note">A target that cannot generate images like its data cannot show '
      'membership through restoration. Precision/recall: k-NN balls (k = 3) in pixel space '
      'against as many real non-member images (Kynkaenniemi et al. 2019); near-copy: the '
      'nearest member is closer than 0.5 x the mean distance to the 50 nearest members '
      '(Carlini et al. 2023).</p>',
      _img_tag(grid, 'target samples'),
    ]
  calibration = _per_image_calibration_html(metrics)
  if calibration:
    parts += ['<h2>Per-image calibration (held-out images)</h2>', calibration]
  for title, path in plots:
    parts += [f'<h2>{html.escape(title)}</h2>', _img_tag(path, title)]
  if dataset:
    power_png = (
      plot_power_curve(dataset['power'], os.path.join(report_dir, 'power.png'))
      if dataset.get('power')
      else None
    )
    parts += _dataset_html(dataset, power_png)
  if evidence:
    parts.append('<h2>Evidence</h2>')
    for kind, items in groups.items():
      if not items:
        continue
      parts.append(f'<h3>{html.escape(kind)}</h3>')
      for caption, path in items:
        parts.append(
          f'<figure>{_img_tag(path, caption)}'
          f'<figcaption>{html.escape(caption)}</figcaption></figure>'
        )
  parts.append('</body>\n</html>\n')
  html_path = os.path.join(workdir, 'report.html')
  _write_atomic(html_path, '\n'.join(parts).encode('utf-8'))
  return html_path
