"""DRC's scoring rules compared on a saved audit: held-out figures, threshold from calibration."""

import json

import numpy as np
import pytest

from drc_jax.analysis import drc_rules
from drc_jax.audit import metrics, results, store
from drc_jax.core import errors


def _audit(wd, seed=0):
  rng = np.random.default_rng(seed)
  split = np.repeat(np.array([1, 0], np.int8), [60, 120])
  sims = rng.normal(size=(180, 4)) + 0.7 * split[:, None]
  heldout = rng.random(180) < 0.6
  table = {'split': split, 'index': np.arange(180), 'drc/sim': sims, 'score/drc': sims.mean(1)}
  results.save_report_inputs(
    str(wd),
    table=table,
    evidence=[],
    config_summary='',
    agree=None,
    samples=None,
    heldout=heldout,
  )
  (wd / store.AUDIT_CONFIG).write_text(json.dumps({'drc': {'vote_quantile': 0.75}}))
  return sims, split == 1, heldout


def test_rules_on_the_heldout_part(tmp_path):
  sims, members, heldout = _audit(tmp_path)
  doc = drc_rules.run(str(tmp_path), str(tmp_path / 'out'), bootstrap=200)
  thr = float(np.quantile(sims[~members & ~heldout], 0.75))
  assert doc['vote_threshold'] == thr
  m, n = members & heldout, ~members & heldout
  assert doc['n_heldout'] == {'members': int(m.sum()), 'nonmembers': int(n.sum())}
  mean, median = sims.mean(1), np.median(sims, 1)
  agree = (sims > thr).sum(1)
  assert doc['rules']['mean']['auc'] == metrics.auc(mean[m], mean[n])
  assert doc['rules']['median']['auc'] == metrics.auc(median[m], median[n])
  assert doc['rules']['agree']['auc'] == metrics.auc(agree[m], agree[n])
  delta = doc['rules']['agree']['minus_mean']
  assert delta['auc'] == pytest.approx(
    metrics.auc(agree[m], agree[n]) - metrics.auc(mean[m], mean[n])
  )
  lo, hi = delta['ci95']['auc']
  assert lo <= delta['auc'] <= hi
  assert 'minus_mean' not in doc['rules']['mean']
  table = (tmp_path / 'out' / 'drc_rules.md').read_text()
  assert '| agree |' in table and 'calibration non-members' in table


def test_rules_need_a_finished_audit(tmp_path):
  with pytest.raises(errors.WorkdirError, match='no audit results'):
    drc_rules.run(str(tmp_path), str(tmp_path / 'out'))
