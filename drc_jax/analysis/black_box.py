"""DRC against ReDiffuse at equal model calls: the two black-box attacks, budget by budget.

A benchmark, not a test::

  python -m drc_jax.analysis black-box --out=runs/black_box --audit_workdir=runs/fashion_mnist

Both attacks need only the target's outputs (DRC: its inpainting restorations; ReDiffuse, Li et
al. 2025: its noise-and-denoise variations). At each budget of model calls per image, each attack
runs with the setting that spends it (``GRID``), as a full audit of the config's split in its own
workdir under ``--out`` (resumable; a setting equal to the config's own is read from
``--audit_workdir`` instead of being scored again). Reported on the audit's held-out part: AUC
and TPR at 1% FPR with their 95% bootstrap intervals, and DRC's AUC minus ReDiffuse's with a 95%
paired-bootstrap interval (the same resampled images for both). Nothing is chosen here: every
budget is reported as it falls. Writes ``black_box.json``, ``black_box.md`` and ``black_box.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging

from drc_jax.analysis import frontier
from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import modes, plots, results, store
from drc_jax.core import errors, fileio, records

ATTACKS = ('drc', 'rediffuse')


def _repaint(steps: int, jumps: tuple[int, int], k: int) -> dict[str, Any]:
  return {
    'drc.restorer': 'repaint',
    'drc.steps': steps,
    'drc.jump_length': jumps[0],
    'drc.jump_n_sample': jumps[1],
    'drc.num_restorations': k,
  }


# model calls per image -> {attack: config overrides that spend exactly that many}. DRC keeps its
# mask and comparator and goes from RePaint 20 steps without jumps (K = 1) to the default (RePaint
# 50 steps, jumps 10 x 2, K = 2); ReDiffuse keeps t = 200, k = 100 (2 calls a draw) and averages
# more draws.
GRID: dict[int, dict[str, dict[str, Any]]] = {
  20: {'drc': _repaint(20, (1, 1), 1), 'rediffuse': {'attacks.rediffuse_n': 10}},
  40: {'drc': _repaint(20, (1, 1), 2), 'rediffuse': {'attacks.rediffuse_n': 20}},
  90: {'drc': _repaint(50, (10, 2), 1), 'rediffuse': {'attacks.rediffuse_n': 45}},
  180: {'drc': _repaint(50, (10, 2), 2), 'rediffuse': {'attacks.rediffuse_n': 90}},
}


def setting_config(config, attack: str, overrides: dict[str, Any]):
  """``config`` auditing ``attack`` alone with ``overrides``, no sample check."""
  c = config.copy_and_resolve_references()
  c.attacks.names = attack
  c.audit.num_samples = 0
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def _is_default(config, overrides: dict[str, Any]) -> bool:
  return all(config[k.split('.')[0]][k.split('.')[1]] == v for k, v in overrides.items())


def _scores(workdir: str, attack: str) -> dict[str, np.ndarray]:
  table = store.load_scores(workdir)
  key = f'score/{attack}'
  if key not in table:
    raise errors.UserError(f'{workdir}: no {attack} scores (its audit ran {sorted(table)})')
  return {'split': table['split'], 'index': table['index'], 'score': table[key]}


def run(config, out_dir: str, audit_workdir: str = '', budgets=None) -> dict[str, Any]:
  """Scores every (budget, attack) of ``GRID`` (or ``budgets`` of it) and writes the comparison."""
  budgets = sorted(GRID) if budgets is None else sorted(budgets)
  unknown = [b for b in budgets if b not in GRID]
  if unknown:
    raise errors.UserError(f'--budgets: {unknown} not in the grid {sorted(GRID)}')
  tables: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  calls: dict[tuple[int, str], int] = {}
  for budget in budgets:
    for attack in ATTACKS:
      overrides = GRID[budget][attack]
      cfg = setting_config(config, attack, overrides)
      if audit_workdir and _is_default(config, overrides):
        workdir = audit_workdir
        recorded = store.recorded_fingerprint(audit_workdir) or {}
        if attack not in str((recorded.get('attacks') or {}).get('names', '')).split(','):
          raise errors.UserError(f'{audit_workdir}: its audit did not run {attack}')
        c = config.to_dict()
        for section in ('drc', 'attacks'):
          want = json.loads(
            json.dumps(store.without_later_defaults(section, c[section]), default=list)
          )
          have = {k: v for k, v in (recorded.get(section) or {}).items() if k != 'names'}
          if {k: v for k, v in want.items() if k != 'names'} != have:
            raise errors.UserError(
              f'{audit_workdir}: its audit ran other {section} settings than --config '
              f'({", ".join(store.diff(have, want)) or section}); leave --audit_workdir out'
            )
        logging.info('black-box: %s at %d calls: the scores of %s', attack, budget, workdir)
      else:
        workdir = os.path.join(out_dir, f'{attack}_{budget}')
        logging.info('black-box: %s at %d calls: auditing in %s', attack, budget, workdir)
        modes.run(cfg, workdir, 'audit')
      tables[budget, attack] = _scores(workdir, attack)
      calls[budget, attack] = _recorded_calls(workdir, attack)
  doc = figures(config, tables, calls, budgets)
  write(doc, out_dir)
  return doc


def _recorded_calls(workdir: str, attack: str) -> int:
  m = records.read_json(os.path.join(workdir, 'metrics.json'), errors.WorkdirError, '')
  return int(m[attack]['model_calls'])


def figures(config, tables, calls, budgets) -> dict[str, Any]:
  """Held-out AUC and TPR@1%FPR with intervals per (budget, attack) and the paired AUC
  difference DRC - ReDiffuse per budget."""
  rows = []
  for budget in budgets:
    drc, red = tables[budget, 'drc'], tables[budget, 'rediffuse']
    if not (
      np.array_equal(drc['index'], red['index']) and np.array_equal(drc['split'], red['split'])
    ):
      raise errors.UserError(f'{budget} calls: the two audits scored different images')
    heldout = results.heldout_rows(config, {'split': drc['split']})
    is_member = drc['split'].astype(np.int64)
    row: dict[str, Any] = {'budget': budget}
    for attack, t in (('drc', drc), ('rediffuse', red)):
      m = metrics_lib.attack_metrics(
        t['score'][heldout & (is_member == 1)],
        t['score'][heldout & (is_member == 0)],
        bootstrap=config.audit.bootstrap,
        seed=config.seed,
      )
      row[attack] = {
        'model_calls': calls[budget, attack],
        'setting': GRID[budget][attack],
        'auc': m['auc'],
        'auc_ci95': m['ci95']['auc'],
        'tpr_at_1pct_fpr': m['tpr_at_1pct_fpr'],
        'tpr_at_1pct_fpr_ci95': m['ci95']['tpr_at_1pct_fpr'],
      }
    delta, ci = frontier.paired_delta(drc['score'], red['score'], is_member, heldout)
    row['auc_drc_minus_rediffuse'] = delta
    row['auc_drc_minus_rediffuse_ci95'] = list(ci)
    rows.append(row)
  members = results.heldout_rows(config, {'split': tables[budgets[0], 'drc']['split']})
  split = tables[budgets[0], 'drc']['split']
  return {
    'n_heldout': {
      'members': int((members & (split == 1)).sum()),
      'nonmembers': int((members & (split == 0)).sum()),
    },
    'rows': rows,
  }


def format_table(doc: dict[str, Any]) -> str:
  lines = [
    '| model calls / image | DRC AUC [95% CI] | ReDiffuse AUC [95% CI] | DRC - ReDiffuse AUC '
    '[95% paired CI] | DRC TPR@1%FPR [95% CI] | ReDiffuse TPR@1%FPR [95% CI] |',
    '|---|---|---|---|---|---|',
  ]

  def auc(e):
    return f'{e["auc"]:.3f} [{e["auc_ci95"][0]:.3f}, {e["auc_ci95"][1]:.3f}]'

  def tpr(e):
    lo, hi = e['tpr_at_1pct_fpr_ci95']
    return f'{100 * e["tpr_at_1pct_fpr"]:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%]'

  for r in doc['rows']:
    lo, hi = r['auc_drc_minus_rediffuse_ci95']
    calls = {r['drc']['model_calls'], r['rediffuse']['model_calls']}
    lines.append(
      f'| {"/".join(str(c) for c in sorted(calls))} | {auc(r["drc"])} | {auc(r["rediffuse"])} | '
      f'{r["auc_drc_minus_rediffuse"]:+.3f} [{lo:+.3f}, {hi:+.3f}] | {tpr(r["drc"])} | '
      f'{tpr(r["rediffuse"])} |'
    )
  n = doc['n_heldout']
  lines += ['', f'Held-out images: {n["members"]} members, {n["nonmembers"]} non-members.']
  return '\n'.join(lines) + '\n'


def plot(doc: dict[str, Any], path: str) -> str:
  fig = plots.new_figure(6.5, 4.2)
  ax = fig.subplots()
  for attack, label, marker in (('drc', 'DRC', 'o-'), ('rediffuse', 'ReDiffuse', 's-')):
    calls = np.asarray([r[attack]['model_calls'] for r in doc['rows']], np.float64)
    auc = np.asarray([r[attack]['auc'] for r in doc['rows']])
    ci = np.asarray([r[attack]['auc_ci95'] for r in doc['rows']])
    ax.errorbar(
      calls, auc, yerr=[auc - ci[:, 0], ci[:, 1] - auc], fmt=marker, capsize=3, label=label
    )
  plots.auc_against_calls_axes(ax, 'Black-box attacks at equal model calls')
  return plots.save_figure(fig, path)


def write(doc: dict[str, Any], out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(out_dir, 'black_box.json'), json.dumps(doc, indent=1))
  fileio.atomic_write_text(os.path.join(out_dir, 'black_box.md'), format_table(doc))
  plot(doc, os.path.join(out_dir, 'black_box.png'))
