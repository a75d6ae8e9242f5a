"""Audit report: the metrics table and one self-contained HTML page (figures from ``plots.py``).

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
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from drc_jax.audit import combiners, plots, summary
from drc_jax.audit import metrics as metrics_lib
from drc_jax.core import fileio

SCORE_PREFIX = 'score/'
# Order of the evidence groups in the HTML; other kinds follow in order of appearance.
EVIDENCE_KINDS = ('highest', 'lowest', 'borderline')


def _samples_html(figures: Mapping[str, Any]) -> str:
  rows = [
    ('samples (deterministic DDIM, 50 steps)', f'{figures["num_samples"]}'),
    ('k-NN precision (samples that look like data)', f'{figures["precision"]:.3f}'),
    ('k-NN recall (data the samples cover)', f'{figures["recall"]:.3f}'),
    *_near_copy_rows(figures),
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


def _near_copy_rows(figures: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The near-copy figures: the calibrated rule on the samples and on real held-out images (its
  floor), Carlini's fixed rule on both, and real-vs-real precision / recall."""
  copy = figures.get('near_copy')
  if not copy:
    return [('near-copies of members', f'{figures["near_copy_fraction"]:.1%}')]

  def rate(entry):
    lo, hi = entry['ci95']
    return f'{entry["rate"]:.1%} [{lo:.1%}, {hi:.1%}] of {entry["n"]}'

  carlini = figures['near_copy_carlini']
  rows = [
    (
      f'near-copies of members, samples (ratio < {copy["alpha"]:.3f}, the threshold that '
      f'{copy["target_fpr"]:.0%} of {copy["n_calibration_nonmembers"]} calibration '
      f'non-members pass)',
      rate(copy['samples']),
    ),
    ('the same rule on real held-out non-members (its floor)', rate(copy['heldout_nonmembers'])),
    (
      f"Carlini et al.'s fixed rule (alpha {carlini['alpha']:g}): samples / real non-members",
      f'{carlini["samples"]["rate"]:.1%} / {carlini["heldout_nonmembers"]["rate"]:.1%}',
    ),
  ]
  real = figures.get('real_vs_real') or {}
  if real.get('precision') is not None:
    rows.append(
      (
        f'k-NN precision / recall of {real["n"]} real held-out images against as many others '
        '(what a perfect generator reaches)',
        f'{real["precision"]:.3f} / {real["recall"]:.3f}',
      )
    )
  return rows


def _agree_from_table(table: Mapping[str, np.ndarray]) -> dict[str, list] | None:
  """The agree curve from ``drc/votes``, with K from ``drc/sim``; None when either is missing."""
  if 'drc/votes' not in table or 'drc/sim' not in table:
    return None
  members, nonmembers = plots.member_nonmember(table, np.asarray(table['drc/votes']))
  return metrics_lib.agree_curve(members, nonmembers, k=int(np.asarray(table['drc/sim']).shape[1]))


def _metrics_html(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """The HTML metrics table: one row per attack."""
  tpr_columns = summary.tpr_columns(metrics)
  calibrated = any('calibrated' in m for m in metrics.values())
  header = ['attack', 'AUC [95% CI]', 'ASR [95% CI]'] + [label for _, label in tpr_columns]
  header += ['model calls / image', 'access']
  if calibrated:
    header += [
      'calibrated threshold',
      'held-out TPR [95% CI]',
      'held-out FPR [95% CI]',
      'held-out accuracy [95% CI]',
      'held-out n (members / non-members)',
    ]
  rows = []
  for attack, m in summary.by_access(metrics):
    ci = m.get('ci95', {})
    cells = [
      attack,
      summary.fmt(m.get('auc'), '.4f') + summary.fmt_interval(ci.get('auc'), percent=False),
      summary.fmt(m.get('asr'), '.4f') + summary.fmt_interval(ci.get('asr'), percent=False),
    ]
    cells += [
      summary.fmt_percent(m.get(key)) + summary.fmt_interval(ci.get(key), percent=True)
      for key, _ in tpr_columns
    ]
    cells += [summary.fmt_nfe(m.get('nfe_per_image')), m.get('access') or '-']
    if calibrated:
      cal = m.get('calibrated', {})
      cal_ci = cal.get('ci95', {})
      n = (
        f'{cal["n_members"]} / {cal["n_nonmembers"]}'
        if 'n_members' in cal and 'n_nonmembers' in cal
        else '-'
      )
      cells += [
        summary.fmt(cal.get('threshold'), '.6g'),
        summary.fmt_percent(cal.get('tpr')) + summary.fmt_interval(cal_ci.get('tpr'), True),
        summary.fmt_percent(cal.get('fpr')) + summary.fmt_interval(cal_ci.get('fpr'), True),
        summary.fmt(cal.get('accuracy'), '.4f')
        + summary.fmt_interval(cal_ci.get('accuracy'), False),
        n,
      ]
    rows.append('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in cells) + '</tr>')
  head = '<tr>' + ''.join(f'<th>{html.escape(h)}</th>' for h in header) + '</tr>'
  notes = ''.join(
    f'<li>{html.escape(who)}: {html.escape(warning)}</li>'
    for warning, who in summary.warnings_once(metrics)
  )
  table = f'<table>\n{head}\n' + '\n'.join(rows) + '\n</table>'
  return table + (f'\n<ul class="note">{notes}</ul>' if notes else '')


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
      fmt = summary.fmt_percent if percent else (lambda v: summary.fmt(v, '.4f'))
      ci = (cal.get('difference_ci95') or {}).get(key)
      if ci is None:
        interval = ''
      elif percent:
        interval = f' [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]'
      else:
        interval = f' [{ci[0]:+.4f}, {ci[1]:+.4f}]'
      clear = ci is not None and (ci[0] > 0 or ci[1] < 0)  # the paired interval excludes 0
      row += [
        fmt(raw),
        fmt(new) + summary.fmt_interval(cal['calibrated']['ci95'].get(key), percent),
        ('+' if diff >= 0 else '')
        + (f'{100 * diff:.2f} pts' if percent else f'{diff:.4f}')
        + interval
        + ('' if clear else ' (interval includes 0)' if ci is not None else ''),
      ]
    row += [
      summary.fmt_percent(cal['at_zero']['tpr'])
      + ' / '
      + summary.fmt_percent(cal['at_zero']['fpr']),
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
    'difference [95% paired CI]',
    'TPR@1%FPR raw',
    'TPR@1%FPR calibrated',
    'difference [95% paired CI]',
    'TPR@0.1%FPR raw',
    'TPR@0.1%FPR calibrated',
    'difference [95% paired CI]',
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


def _suspect_caption(item: Mapping[str, Any]) -> str:
  """A strongest suspect's panel title, its combined score and rank, and which image it is."""
  caption = (
    plots.evidence_title(item) + f'; combined score {item["combined"]:.4g} (#{item["rank"]})'
  )
  if item.get('file'):
    caption += f', {item["file"]}'
  elif item.get('label_name'):
    caption += f', {item["label_name"]}'
  return caption + (f', sha256 {item["sha256"][:16]}' if item.get('sha256') else '')


def _dataset_html(dataset: Mapping[str, Any], report_dir: str, number: int) -> list[str]:
  """The section of one suspect set (its ``dataset.json`` of ``--mode=dataset``): the verdict,
  the tests, the combiner, the power curve with the set's size marked, and DRC's panels of its
  strongest suspects. Its figures go to ``report_dir/dataset_<number>_*.png``."""
  sus, ref = dataset['suspect'], dataset['reference']
  name = str(dataset.get('name') or sus['source'])
  parts = [
    f'<h3>Suspect set {html.escape(name)}</h3>',
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
        summary.p_text(t['p_value']),
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
  labels = combiners.uses_member_labels(comb)
  parts.append(
    f'<p class="note"><b>Combiner: {html.escape(str(comb["kind"]))}, '
    f'{"uses member labels" if labels else "no member labels"}</b>: '
    f'{html.escape(combiners.describe(comb))}.</p>'
  )
  parts.append(
    '<ul class="note">'
    + ''.join(f'<li>{html.escape(v)}</li>' for v in dataset.get('validity', ()))
    + '</ul>'
  )
  power = dataset.get('power')
  if power:
    parts.append('<h4>Power curve</h4>')
    png = os.path.join(report_dir, f'dataset_{number:02d}_power.png')
    parts.append(_img_tag(plots.plot_power_curve(power, png, sus['n']), f'power curve, {name}'))
    sizes = sorted(set(power['members']['sizes']) | set(power['nonmembers']['sizes']))
    rows = []
    for n in sizes:
      row = [str(n)]
      for kind in ('members', 'nonmembers'):
        entry = power[kind]
        if n in entry['sizes']:
          i = entry['sizes'].index(n)
          row.append(
            summary.fmt_percent(entry['combined']['rate'][i])
            + summary.fmt_interval(entry['combined']['ci95'][i], percent=True)
          )
        else:
          row.append('-')
      row += _fpr_check_cells(power, n)
      rows.append(row)
    parts.append(
      _html_table(
        [
          'suspect set size',
          'member sets: TPR [95% CI]',
          'non-member sets: FPR [95% CI]',
          'FPR upper bound <= alpha',
        ],
        rows,
      )
    )
    parts.append(
      f'<p class="note">{power["repetitions"]} random sets per size, drawn from '
      f'{power["pools"]["members"]} held-out members (tested against the held-out '
      f'reference) and from the {power["pools"]["reference"]} held-out references '
      f'(tested against the rest of them); {html.escape(power["interval"])} intervals '
      f'(the sets share one pool, so the intervals are approximate). The false-positive rate is '
      f'shown at most alpha = {power["alpha"]:g} only when its upper bound is; a test whose rate '
      f'is alpha itself stays "not shown" at any number of sets.</p>'
    )
    needed = power.get('repetitions_needed')
    if needed and power['repetitions'] < needed:
      parts.append(
        f'<p class="note"><b>{power["repetitions"]} sets per size cannot show a false-positive '
        f'rate at most alpha even with no rejection</b>: that needs {needed} '
        '(config.dataset.power_repetitions).</p>'
      )
  evidence = dataset.get('evidence') or ()
  if evidence:
    parts += [
      '<h4>Strongest suspects</h4>',
      f'<p class="note">DRC on the {len(evidence)} suspect images of highest combined score '
      "(original | degraded | restored | difference); the DRC score's percentile among the "
      "audit's non-members and DRC's calibrated decision, as in the evidence below.</p>",
    ]
    for i, item in enumerate(evidence):
      png = os.path.join(report_dir, f'dataset_{number:02d}_strongest_{i:02d}.png')
      caption = _suspect_caption(item)
      parts.append(
        f'<figure>{_img_tag(plots.evidence_panel(item, png), caption)}'
        f'<figcaption>{html.escape(caption)}</figcaption></figure>'
      )
  return parts


def _fpr_check_cells(power: Mapping[str, Any], n: int) -> list[str]:
  """The combined test's false-positive check at size n: its upper bound and status (a result
  of an earlier drc_jax checked the interval's lower end instead, and says so)."""
  entry = power['nonmembers']
  if n not in entry['sizes']:
    return ['-']
  i = entry['sizes'].index(n)
  if 'fpr_upper' not in entry:
    within = entry.get('within_alpha', {}).get('combined', [])
    return [('lower end <= alpha' if within[i] else 'NO') + ' (earlier check)']
  upper, status = entry['fpr_upper']['combined'][i], entry['fpr_check']['combined'][i]
  return [f'{summary.fmt_percent(upper)}: {"yes" if status == "shown" else status}']


def _img_tag(png_path: str, alt: str) -> str:
  encoded = base64.b64encode(epath.Path(png_path).read_bytes()).decode('ascii')
  return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _evidence_caption(item: Mapping[str, Any], table: Mapping[str, np.ndarray]) -> str:
  """The panel title plus the image's label (its name when the item has ``label_name``) and
  hash prefix, looked up in the table."""
  caption = plots.evidence_title(item)
  if item.get('label_name'):
    caption += f', {item["label_name"]}'
  if 'index' in table and 'split' in table:
    split = 1 if plots.split_name(item['split']) == 'member' else 0
    rows = np.flatnonzero(
      (np.asarray(table['index']) == int(item['index'])) & (np.asarray(table['split']) == split)
    )
    if rows.size:
      if 'label' in table and not item.get('label_name'):
        caption += f', label {int(np.asarray(table["label"])[rows[0]])}'
      if 'hash' in table:
        caption += f', sha256 {str(np.asarray(table["hash"])[rows[0]])[:16]}'
  return caption


def _verdict_html(lines: Sequence[str], smoke: bool) -> str:
  items = ''.join(f'<li>{html.escape(line)}</li>' for line in lines)
  cls = 'verdict smoke' if smoke else 'verdict'
  return f'<section class="{cls}" id="verdict"><h2>Verdict</h2><ul>{items}</ul></section>'


_CSS = """
.verdict { background: #e8f0fe; border-left: 8px solid #1a56c4; padding: 0.4em 1.2em; }
.verdict.smoke { background: #fff4d6; border-left-color: #c98a00; }
.verdict h2 { margin: 0.3em 0; }
.verdict li { margin: 0.35em 0; line-height: 1.35; }
@media (max-width: 700px) { body { margin: 0.6em; } table { font-size: 0.75em; } }
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
.banner { background: #fde2e1; border: 1px solid #c0392b; padding: 0.8em; }
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
  datasets: Sequence[Mapping[str, Any]] = (),
  heldout: np.ndarray | None = None,
  smoke: bool = False,
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
    datasets: the results of ``--mode=dataset``, one per suspect set (``suspects.read_results``:
      each with its ``name`` and ``evidence`` items), each in its own section.
    heldout: bool [rows], the held-out images the ROC curves are drawn on (None: every image).
    smoke: a runlocal (smoke) run: the verdict says its figures mean nothing about membership.

  Returns:
    The path of ``report.html``.
  """
  report_dir = os.path.join(workdir, 'report')
  epath.Path(report_dir).mkdir(parents=True, exist_ok=True)
  roc_table = table if heldout is None else {k: v[heldout] for k, v in table.items()}
  figures = [
    (
      'ROC (held-out)',
      plots.plot_roc(roc_table, os.path.join(report_dir, 'roc.png'), log_scale=False),
    ),
    (
      'ROC, log scale (held-out)',
      plots.plot_roc(roc_table, os.path.join(report_dir, 'roc_log.png'), log_scale=True),
    ),
    ('Score histograms', plots.plot_histograms(table, os.path.join(report_dir, 'histograms.png'))),
  ]
  if agree is None:
    agree = _agree_from_table(table)
  if agree is not None:
    figures.append(
      ('DRC agree number', plots.plot_agree(agree, os.path.join(report_dir, 'agree.png')))
    )

  kinds = list(EVIDENCE_KINDS) + [
    k for k in dict.fromkeys(str(e['kind']) for e in evidence) if k not in EVIDENCE_KINDS
  ]
  groups: dict[str, list[tuple[str, str]]] = {kind: [] for kind in kinds}
  for i, item in enumerate(evidence):
    safe_kind = re.sub(r'[^A-Za-z0-9_-]', '_', str(item['kind']))
    path = plots.evidence_panel(item, os.path.join(report_dir, f'evidence_{i:03d}_{safe_kind}.png'))
    groups[str(item['kind'])].append((_evidence_caption(item, table), path))

  split = np.asarray(table['split'])
  parts = [
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
    '<title>Membership inference audit</title>',
    '<meta name="viewport" content="width=device-width, initial-scale=1">',
    f'<style>{_CSS}</style>\n</head>\n<body>',
    '<h1>Membership inference audit</h1>',
    # The verdict first: a smoke run, a failed control, what detects membership, each set.
    _verdict_html(summary.verdict(metrics, datasets, smoke), smoke),
    f'<p>{int((split == 1).sum())} members, {int((split == 0).sum())} non-members; attacks: '
    f'{html.escape(", ".join(plots.attack_names(table)))}.</p>',
  ]
  if config_summary:
    parts += ['<h2>Configuration</h2>', f'<pre>{html.escape(config_summary)}</pre>']
  parts += [
    '<h2>Metrics (held-out images)</h2>'
    if next(iter(metrics.values()), {}).get('scope') == 'heldout'
    else '<h2>Metrics</h2>',
    f'<p class="note">{html.escape(summary.scope_line(metrics) or "all images")}.</p>',
    _metrics_html(metrics),
  ]
  protocol = (metrics.get('drc') or {}).get('protocol')
  if protocol:
    parts.append(f'<p class="note">drc = {html.escape(protocol)}.</p>')
  parts += [
    '<p class="note">Higher score = member; an image is called a member iff score &gt;= '
    'threshold. TPR@f%FPR is the highest TPR whose FPR does not exceed f, without '
    'interpolation; with n non-members it rests on about n&middot;f false positives. '
    'Intervals are 95% percentile bootstraps resampling members and non-members '
    'separately.</p>',
  ]
  if samples is not None:
    grid = plots.plot_samples(
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
      'nearest member is closer than alpha x the mean distance to the 50 nearest members '
      '(Carlini et al. 2023), with alpha set on real unseen images of the calibration part so '
      'that at most 1% of them pass, and its floor measured on the held-out ones.</p>',
      _img_tag(grid, 'target samples'),
    ]
  gen_rows = summary.generated_rows(metrics)
  if gen_rows:
    parts += [
      '<h2>Generated-image control</h2>',
      _html_table(
        [
          'attack',
          "FPR on the target's own samples [95% CI]",
          'FPR on real held-out non-members [95% CI]',
          'samples',
        ],
        gen_rows,
      ),
      '<p class="note">The target\'s own samples (the sample check above, saved as 8-bit '
      "images) scored by every attack as known non-members, at the attack's calibrated "
      "threshold. Attacks tend to call a model's generations members; where the first column "
      'is well above the second, a suspect image that may be a generation of this model says '
      'little about training membership.</p>',
    ]
  calibration = _per_image_calibration_html(metrics)
  if calibration:
    parts += ['<h2>Per-image calibration (held-out images)</h2>', calibration]
  for title, path in figures:
    parts += [f'<h2>{html.escape(title)}</h2>', _img_tag(path, title)]
  if datasets:
    parts += [
      '<h2>Dataset inference</h2>',
      f'<p class="note">{len(datasets)} suspect set(s), each tested on its own against the '
      'held-out reference (a one-sided test of the combined score).</p>',
    ]
    for number, dataset in enumerate(datasets):
      parts += _dataset_html(dataset, report_dir, number)
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
  fileio.atomic_write_bytes(html_path, '\n'.join(parts).encode('utf-8'))
  return html_path
