"""Attacks and audits compared on saved scores: held-out, paired on the same images."""

import json

import numpy as np
import pytest

from drc_jax.analysis import compare
from drc_jax.audit import metrics, results, store
from drc_jax.core import errors

N = 180


def _audit(wd, scores, heldout, order=None, swap=False):
  """A finished audit's saved inputs: 60 members then 120 non-members (rows permuted by
  ``order``), image hashes 'img<i>'; ``swap``: image 0 a non-member and image 60 a member."""
  split = np.repeat(np.array([1, 0], np.int8), [60, 120])
  if swap:
    split[[0, 60]] = split[[60, 0]]
  table = {
    'split': split,
    'index': np.arange(N),
    'hash': np.asarray([f'img{i}' for i in range(N)]),
    **{f'score/{k}': v for k, v in scores.items()},
  }
  order = np.arange(N) if order is None else order
  table = {k: v[order] for k, v in table.items()}
  wd.mkdir(exist_ok=True)
  results.save_report_inputs(
    str(wd),
    table=table,
    evidence=[],
    config_summary='',
    agree=None,
    samples=None,
    heldout=heldout[order],
  )
  (wd / store.AUDIT_CONFIG).write_text(json.dumps({'drc': {}}))
  return split == 1


def _scores(seed, strength):
  rng = np.random.default_rng(seed)
  member = np.repeat([1.0, 0.0], [60, 120])
  return {
    'drc': rng.normal(size=N) + strength * member,
    'sima': rng.normal(size=N) + 2.0 * member,
    'loss': rng.normal(size=N),
  }


def test_attacks_against_the_reference_on_the_heldout_images(tmp_path):
  heldout = np.random.default_rng(1).random(N) < 0.6
  s = _scores(0, 0.8)
  members = _audit(tmp_path / 'w', s, heldout)
  doc = compare.run(str(tmp_path / 'w'), str(tmp_path / 'out'), bootstrap=200)
  m, n = members & heldout, ~members & heldout
  assert doc['n_heldout'] == {'members': int(m.sum()), 'nonmembers': int(n.sum())}
  d = doc['attacks']['sima']['minus_reference']
  expected = metrics.auc(s['sima'][m], s['sima'][n]) - metrics.auc(s['drc'][m], s['drc'][n])
  assert d['auc'] == pytest.approx(expected) and expected > 0.1
  lo, hi = d['ci95']['auc']
  assert 0 < lo <= d['auc'] <= hi  # SimA's stronger signal: the interval excludes 0
  lo, hi = doc['attacks']['loss']['minus_reference']['ci95']['auc']
  assert hi < 0  # loss is noise
  assert 'minus_reference' not in doc['attacks']['drc']
  md = (tmp_path / 'out' / 'compare.md').read_text()
  assert '| sima |' in md and 'minus drc' in md
  with pytest.raises(errors.UserError, match='--attacks'):
    compare.run(str(tmp_path / 'w'), str(tmp_path / 'out'), attacks='drc,clid')


def test_two_audits_of_the_same_images_in_another_row_order(tmp_path):
  heldout = np.random.default_rng(1).random(N) < 0.6
  a, b = _scores(0, 1.5), _scores(2, 0.2)
  members = _audit(tmp_path / 'a', a, heldout)
  perm = np.random.default_rng(3).permutation(N)
  _audit(tmp_path / 'b', b, heldout, order=perm)  # rows in another order: matched by hash
  doc = compare.run(
    str(tmp_path / 'a'), str(tmp_path / 'out'), against=str(tmp_path / 'b'), bootstrap=200
  )
  m, n = members & heldout, ~members & heldout
  row = doc['attacks']['drc']
  assert row['second']['auc'] == metrics.auc(b['drc'][m], b['drc'][n])
  diff = row['first_minus_second']
  assert diff['auc'] == pytest.approx(
    metrics.auc(a['drc'][m], a['drc'][n]) - metrics.auc(b['drc'][m], b['drc'][n])
  )
  assert diff['ci95']['auc'][0] > 0
  assert set(doc['attacks']) == {'drc', 'sima', 'loss'}


def test_audits_of_other_images_or_holdouts_are_refused(tmp_path):
  heldout = np.random.default_rng(1).random(N) < 0.6
  _audit(tmp_path / 'a', _scores(0, 1.0), heldout)
  _audit(tmp_path / 'b', _scores(0, 1.0), ~heldout)
  with pytest.raises(errors.UserError, match='hold out other images'):
    compare.run(str(tmp_path / 'a'), str(tmp_path / 'o'), against=str(tmp_path / 'b'))
  _audit(tmp_path / 'c', _scores(0, 1.0), heldout, swap=True)
  with pytest.raises(errors.UserError, match='split the images otherwise'):
    compare.run(str(tmp_path / 'a'), str(tmp_path / 'o'), against=str(tmp_path / 'c'))
  with pytest.raises(errors.WorkdirError, match='no audit results'):
    compare.run(str(tmp_path / 'none'), str(tmp_path / 'o'))
