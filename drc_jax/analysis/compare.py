"""Attacks compared on finished audits, paired on the same held-out images.

A benchmark, not a test:

  python -m drc_jax.analysis compare --workdir=W [--reference=drc] [--attacks=drc,sima,...]
  python -m drc_jax.analysis compare --workdir=W --against=W2 [--attacks=...]

Reads what the audits saved (each image's audited scores, its SHA-256, which images are held out),
scores nothing. One workdir: every attack's held-out AUC and TPR at 1% FPR with 95% bootstrap
intervals, and its difference from ``--reference`` with a 95% paired-bootstrap interval (every
resample draws the same members and non-members for both attacks), so "attack A beats attack B
on this audit" is a statement with an interval. Two workdirs (``--against``): two audits of the
same images, e.g. two targets trained on the same members (a text-conditioned one and an
unconditional one), each attack both ran, ``W`` minus ``W2``, paired on the images. The images
are matched by their SHA-256; the two audits must hold the same images as members and as
non-members and the same held-out part, else the comparison is refused. Writes
``compare.json`` and ``compare.md`` into ``--out``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import results, store
from drc_jax.core import errors, fileio


def _audit(workdir: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
  """``(scores by attack, member bool, held-out bool, image SHA-256)`` of a finished audit."""
  if store.recorded_fingerprint(workdir) is None:
    raise errors.WorkdirError(f'{workdir} holds no audit results; run --mode=audit first')
  inputs = results.load_report_inputs(workdir)
  table = inputs['table']
  scores = {
    k.split('/', 1)[1]: np.asarray(v, np.float64) for k, v in table.items() if k[:6] == 'score/'
  }
  members = np.asarray(table['split']) == 1
  return scores, members, np.asarray(inputs['heldout'], bool), np.asarray(table['hash']).astype(str)


def _figures(s: np.ndarray, m: np.ndarray, n: np.ndarray, bootstrap: int, seed: int) -> dict:
  f = metrics_lib.attack_metrics(s[m], s[n], bootstrap=bootstrap, seed=seed)
  return {'auc': f['auc'], 'tpr_at_1pct_fpr': f['tpr_at_1pct_fpr'], 'ci95': f['ci95']}


def _difference(a: np.ndarray, b: np.ndarray, m, n, bootstrap: int, seed: int) -> dict:
  """``b - a`` on the same images: AUC and TPR@1%FPR, with paired-bootstrap intervals."""
  return {
    'auc': metrics_lib.auc(b[m], b[n]) - metrics_lib.auc(a[m], a[n]),
    'tpr_at_1pct_fpr': _tpr(b, m, n) - _tpr(a, m, n),
    'ci95': metrics_lib.paired_difference_ci(
      (a[m], b[m]), (a[n], b[n]), fprs=(0.01,), bootstrap=bootstrap, seed=seed
    ),
  }


def _tpr(s, m, n) -> float:
  fpr, tpr = metrics_lib.roc_curve(s[m], s[n])[:2]
  return metrics_lib.tpr_at_fpr(fpr, tpr, 0.01)


def _names(available, attacks: str) -> list[str]:
  if not attacks:
    return sorted(available)
  names = [a.strip() for a in attacks.split(',') if a.strip()]
  missing = [a for a in names if a not in available]
  if missing:
    raise errors.UserError(f'--attacks: {missing} not scored (scored: {sorted(available)})')
  return names


def _align(workdir: str, against: str, a, b) -> np.ndarray:
  """Rows of ``b`` in the order of ``a``'s images (by SHA-256); refuses other images."""
  (_, m_a, h_a, sha_a), (_, m_b, h_b, sha_b) = a, b
  pos = {s: i for i, s in enumerate(sha_b)}
  if len(pos) != len(sha_b) or len(set(sha_a)) != len(sha_a):
    raise errors.UserError('compare --against: an audit holds the same image twice')
  if set(sha_a) != set(pos):
    raise errors.UserError(
      f'compare --against: {workdir} and {against} audited other images '
      f'({len(set(sha_a) - set(pos))} of the first are not in the second)'
    )
  order = np.asarray([pos[s] for s in sha_a])
  if not np.array_equal(m_a, m_b[order]):
    raise errors.UserError(f'compare --against: {workdir} and {against} split the images otherwise')
  if not np.array_equal(h_a, h_b[order]):
    raise errors.UserError(
      f'compare --against: {workdir} and {against} hold out other images (another seed or '
      'calibration fraction)'
    )
  return order


def run(
  workdir: str,
  out_dir: str,
  *,
  against: str = '',
  reference: str = 'drc',
  attacks: str = '',
  bootstrap: int = 1000,
  seed: int = 0,
) -> dict[str, Any]:
  """Compares the attacks of the audit in ``workdir`` (with ``reference``), or the same attacks
  in ``workdir`` and ``against``; writes and returns the comparison."""
  first = _audit(workdir)
  scores, members, heldout, _ = first
  m, n = members & heldout, ~members & heldout
  doc: dict[str, Any] = {
    'workdir': os.path.abspath(workdir),
    'n_heldout': {'members': int(m.sum()), 'nonmembers': int(n.sum())},
    'bootstrap': bootstrap,
  }
  rows = {}
  if against:
    second = _audit(against)
    order = _align(workdir, against, first, second)
    other = {k: v[order] for k, v in second[0].items()}
    names = _names(set(scores) & set(other), attacks)
    for name in names:
      rows[name] = {
        'first': _figures(scores[name], m, n, bootstrap, seed),
        'second': _figures(other[name], m, n, bootstrap, seed),
        'first_minus_second': _difference(other[name], scores[name], m, n, bootstrap, seed),
      }
    doc['against'] = os.path.abspath(against)
    doc['command'] = f'python -m drc_jax.analysis compare --workdir={workdir} --against={against}'
  else:
    names = _names(scores, attacks)
    if reference not in scores:
      raise errors.UserError(f'--reference: {reference!r} not scored (scored: {sorted(scores)})')
    for name in names:
      rows[name] = _figures(scores[name], m, n, bootstrap, seed)
      if name != reference:
        rows[name]['minus_reference'] = _difference(
          scores[reference], scores[name], m, n, bootstrap, seed
        )
    doc['reference'] = reference
    doc['command'] = (
      f'python -m drc_jax.analysis compare --workdir={workdir} --reference={reference}'
    )
  if attacks:
    doc['command'] += f' --attacks={attacks}'
  doc['attacks'] = rows
  os.makedirs(out_dir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(out_dir, 'compare.json'), json.dumps(doc, indent=1))
  fileio.atomic_write_text(os.path.join(out_dir, 'compare.md'), format_table(doc))
  return doc


def _auc(f: dict) -> str:
  ci = f['ci95'].get('auc')
  return f'{f["auc"]:.3f}' + (f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')


def _delta(d: dict) -> str:
  ci = d['ci95'].get('auc')
  return f'{d["auc"]:+.3f}' + (f' [{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else '')


def _delta_tpr(d: dict) -> str:
  ci = d['ci95'].get(metrics_lib.tpr_metric_name(0.01))
  out = f'{100 * d["tpr_at_1pct_fpr"]:+.1f}%'
  return out + (f' [{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]' if ci else '')


def format_table(doc: dict[str, Any]) -> str:
  """Markdown: one row per attack, held-out figures and the paired differences."""
  h = doc['n_heldout']
  head = f'{h["members"]} held-out members, {h["nonmembers"]} held-out non-members'
  if 'against' in doc:
    lines = [
      f'{doc["workdir"]} (first) against {doc["against"]} (second), the same {head}:',
      '',
      '| attack | AUC, first [95% CI] | AUC, second [95% CI] | first - second, AUC '
      '[95% paired CI] | first - second, TPR@1%FPR [95% paired CI] |',
      '|---|---|---|---|---|',
    ]
    for name, r in doc['attacks'].items():
      d = r['first_minus_second']
      lines.append(
        f'| {name} | {_auc(r["first"])} | {_auc(r["second"])} | {_delta(d)} | {_delta_tpr(d)} |'
      )
  else:
    ref = doc['reference']
    lines = [
      f'{doc["workdir"]}, {head}; differences from {ref} on the same images:',
      '',
      f'| attack | AUC [95% CI] | TPR@1%FPR | minus {ref}, AUC [95% paired CI] | minus {ref}, '
      'TPR@1%FPR [95% paired CI] |',
      '|---|---|---|---|---|',
    ]
    for name, r in doc['attacks'].items():
      d = r.get('minus_reference')
      lines.append(
        f'| {name} | {_auc(r)} | {100 * r["tpr_at_1pct_fpr"]:.1f}% | '
        f'{_delta(d) if d else "-"} | {_delta_tpr(d) if d else "-"} |'
      )
  return '\n'.join(lines) + '\n'
