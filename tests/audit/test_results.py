"""DRC's audited score from its saved similarities: the rule, and what its threshold may see."""

import numpy as np
import pytest

from drc_jax import api
from drc_jax.audit import generated, results
from drc_jax.core import config_base
from drc_jax.targets import shipped


def _table(seed=0):
  rng = np.random.default_rng(seed)
  split = np.repeat(np.array([1, 0], np.int8), 40)
  sims = rng.normal(size=(80, 3)) + 0.8 * split[:, None]
  return {'split': split, 'index': np.arange(80), 'drc/sim': sims, 'score/drc': sims.mean(1)}


def _config(how):
  c = config_base.load_config('configs/fashion_mnist.py')
  with c.unlocked():
    c.drc.aggregation = how
    c.audit.calibration_fraction = 0.25
  return c


def test_vote_threshold_sees_calibration_nonmembers_only():
  c = _config('agree')
  table = _table()
  heldout = results.heldout_rows(c, table)
  rule = results.apply_drc_rule(c, table)
  cal_non = table['drc/sim'][(table['split'] == 0) & ~heldout]
  assert rule['vote_threshold'] == float(np.quantile(cal_non, c.drc.vote_quantile))
  assert rule['agree']['threshold_fit_on'] == 'calibration non-members'
  # moving every held-out non-member changes neither the threshold nor any member's votes
  moved = _table()
  moved['drc/sim'][(moved['split'] == 0) & heldout] += 5.0
  again = results.apply_drc_rule(c, moved)
  assert again['vote_threshold'] == rule['vote_threshold']
  m = table['split'] == 1
  np.testing.assert_array_equal(moved['drc/votes'][m], table['drc/votes'][m])
  # the agree curve counts held-out images only
  assert rule['agree']['n_members'] + rule['agree']['n_nonmembers'] == int(heldout.sum())


@pytest.mark.parametrize('how', ['mean', 'median', 'agree'])
def test_rule_sets_the_audited_score(how):
  c = _config(how)
  table = _table()
  rule = results.apply_drc_rule(c, table)
  sims = table['drc/sim']
  want = {
    'mean': sims.mean(1),
    'median': np.median(sims, 1),
    'agree': (sims > rule['vote_threshold']).sum(1).astype(float),
  }[how]
  np.testing.assert_allclose(table['score/drc'], want)
  assert rule['aggregation'] == how and rule['protocol'].startswith('DRC, pixel variant')
  # the generated-image control scores DRC by the same rule and threshold
  metrics = {'drc': {**rule, 'calibrated': {'threshold': 1.5, 'fpr': 0.1, 'ci95': {'fpr': [0, 1]}}}}
  gen = generated.control(metrics, {'drc': sims[:10]})
  expect = {
    'mean': sims[:10].mean(1),
    'median': np.median(sims[:10], 1),
    'agree': (sims[:10] > rule['vote_threshold']).sum(1),
  }[how]
  assert gen['drc']['fpr'] == np.mean(expect >= 1.5)


def test_api_refuses_a_rule_its_calibration_was_not_scored_with(tmp_path):
  directory = shipped.resolve('shipped:fashion_mnist')
  assert shipped.read_drc_rule(directory)['aggregation'] == 'mean'
  with pytest.raises(api.validate.ConfigError, match="calibration scores .* under 'mean'"):
    api.Auditor('shipped:fashion_mnist', config=_config('agree'), attacks=['drc'])
