"""DRC's scoring rules side by side on one finished audit: mean, median and the agree number.

A benchmark, not a test:

  python -m drc_jax.analysis drc-rules --workdir=runs/fashion_mnist [--out=runs/drc_rules]

Reads what the audit saved (its per-restoration similarities ``drc/sim``, which images are held
out, the recorded ``drc.vote_quantile``), restores nothing, and scores every image by each rule of
``drc.AGGREGATIONS``. The agree number's vote threshold is fitted on the calibration non-members
only, as the audit fits it. Every figure is on the held-out images: AUC and TPR at 1% and 0.1% FPR
with 95% bootstrap intervals, and each rule's difference from the mean with a 95% paired-bootstrap
interval (the same resampled images for both rules). Writes ``drc_rules.json`` and
``drc_rules.md`` into ``--out``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import results, store
from drc_jax.core import errors, fileio
from drc_jax.drc import scorer as drc_lib

REFERENCE = 'mean'


def run(workdir: str, out_dir: str, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Scores the audit in ``workdir`` by every DRC rule; writes and returns the comparison."""
  recorded = store.recorded_fingerprint(workdir)
  if recorded is None:
    raise errors.WorkdirError(f'{workdir} holds no audit results; run --mode=audit first')
  inputs = results.load_report_inputs(workdir)
  table, heldout = inputs['table'], np.asarray(inputs['heldout'], bool)
  if 'drc/sim' not in table:
    raise errors.WorkdirError(f'{workdir}: its audit ran no DRC (no drc/sim in its scores)')
  sims = np.asarray(table['drc/sim'], np.float64)
  members = np.asarray(table['split']) == 1
  quantile = float(recorded['drc']['vote_quantile'])
  threshold = drc_lib.vote_threshold(sims[~members & ~heldout], quantile)
  scores = {how: drc_lib.aggregate(sims, how, threshold) for how in drc_lib.AGGREGATIONS}
  m, n = members & heldout, ~members & heldout
  rules = {}
  for how, s in scores.items():
    figures = metrics_lib.attack_metrics(s[m], s[n], bootstrap=bootstrap, seed=seed)
    entry = {
      'auc': figures['auc'],
      'tpr_at_1pct_fpr': figures['tpr_at_1pct_fpr'],
      'tpr_at_0p1pct_fpr': figures['tpr_at_0p1pct_fpr'],
      'ci95': figures['ci95'],
    }
    if how != REFERENCE:
      ref = scores[REFERENCE]
      entry['minus_mean'] = {
        'auc': figures['auc'] - metrics_lib.auc(ref[m], ref[n]),
        'ci95': metrics_lib.paired_difference_ci(
          (ref[m], s[m]), (ref[n], s[n]), bootstrap=bootstrap, seed=seed
        ),
      }
    rules[how] = entry
  doc = {
    'workdir': os.path.abspath(workdir),
    'command': f'python -m drc_jax.analysis drc-rules --workdir={workdir}',
    'k': int(sims.shape[1]),
    'vote_quantile': quantile,
    'vote_threshold': threshold,
    'vote_threshold_fit_on': 'calibration non-members',
    'n_heldout': {'members': int(m.sum()), 'nonmembers': int(n.sum())},
    'rules': rules,
  }
  os.makedirs(out_dir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(out_dir, 'drc_rules.json'), json.dumps(doc, indent=1))
  fileio.atomic_write_text(os.path.join(out_dir, 'drc_rules.md'), format_table(doc))
  return doc


def _ci(interval, percent: bool = False) -> str:
  if not interval:
    return ''
  lo, hi = interval
  return f' [{100 * lo:.1f}%, {100 * hi:.1f}%]' if percent else f' [{lo:+.3f}, {hi:+.3f}]'


def format_table(doc: dict[str, Any]) -> str:
  """Markdown: one row per rule, held-out figures, the difference from the mean."""
  lines = [
    f'DRC rules on {doc["n_heldout"]["members"]} held-out members and '
    f'{doc["n_heldout"]["nonmembers"]} held-out non-members (K = {doc["k"]}; votes above '
    f'{doc["vote_threshold"]:.4g}, the {doc["vote_quantile"]:g} quantile of the calibration '
    'non-members):',
    '',
    '| rule | AUC [95% CI] | minus mean [95% paired CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR |',
    '|---|---|---|---|---|',
  ]
  for how, r in doc['rules'].items():
    ci = r['ci95']
    auc_ci = f' [{ci["auc"][0]:.3f}, {ci["auc"][1]:.3f}]' if ci.get('auc') else ''
    delta = ''
    if 'minus_mean' in r:
      delta = f'{r["minus_mean"]["auc"]:+.3f}' + _ci(r['minus_mean']['ci95'].get('auc'))
    lines.append(
      f'| {how} | {r["auc"]:.3f}{auc_ci} | {delta} | '
      f'{100 * r["tpr_at_1pct_fpr"]:.1f}%{_ci(ci.get("tpr_at_1pct_fpr"), True)} | '
      f'{100 * r["tpr_at_0p1pct_fpr"]:.1f}% |'
    )
  return '\n'.join(lines) + '\n'
