"""Per-image calibration: features by hand, the pinball fit against known quantiles, no leakage."""

import numpy as np
import pytest

from drc_jax.audit import calibration as C
from drc_jax.audit import metrics
from drc_jax.core import config_base


def test_image_features_by_hand():
  constant = np.full((1, 4, 4, 1), 0.5)
  np.testing.assert_allclose(C.image_features(constant), [[0.5, 0.0, 0.0, 0.0]])
  # Vertical stripes -1, 1, -1, 1 (RGB, equal channels): mean 0, std 1; the border is half -1,
  # half 1, median 0, so every pixel is 1 away: all foreground. Horizontal differences are +-2:
  # 4 rows x 3 pairs x 4 = 48, vertical ones 0; energy 48 / 16 = 3.
  stripes = np.tile(np.array([-1.0, 1.0, -1.0, 1.0])[None, None, :, None], (1, 4, 1, 3))
  np.testing.assert_allclose(C.image_features(stripes), [[0.0, 1.0, 1.0, 3.0]])
  # A black image with one white pixel in the middle of 4x4: background -1, 1 of 16 foreground;
  # mean (15 * -1 + 1) / 16; the pixel has 4 neighbours, each difference 2: energy 16 / 16.
  dot = -np.ones((1, 4, 4, 1))
  dot[0, 1, 1, 0] = 1.0
  f = C.image_features(dot)[0]
  assert f[0] == pytest.approx(-14 / 16) and f[2] == 1 / 16 and f[3] == pytest.approx(1.0)


def test_pinball_loss_by_hand():
  assert float(C.pinball_loss(2.0, 0.9)) == pytest.approx(1.8)
  assert float(C.pinball_loss(-2.0, 0.9)) == pytest.approx(0.2)
  assert float(C.pinball_loss(0.0, 0.3)) == 0.0


def test_fit_recovers_a_known_conditional_quantile():
  # y = 1 + 2 x + (0.5 + x) e with e ~ N(0, 1): the 0.9 quantile is linear in x,
  # q(x) = 1 + 2 x + 1.28155 (0.5 + x) = 1.64078 + 3.28155 x; the 0.5 quantile is 1 + 2 x.
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, 20000)
  y = 1 + 2 * x + (0.5 + x) * rng.normal(size=x.size)
  noise_feature = rng.normal(size=x.size)  # uninformative: its weight must stay near 0
  features = np.stack([x, noise_feature], axis=1)
  model = C.fit_quantile_regression(features, np.stack([y, -y]), tau=0.9)
  grid = np.stack([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]], axis=1)
  pred = model.predict(grid)
  np.testing.assert_allclose(pred[0], 1.64078 + 3.28155 * grid[:, 0], atol=0.06)
  # -y's 0.9 quantile is minus y's 0.1 quantile: -(1 + 2 x - 1.28155 (0.5 + x)).
  np.testing.assert_allclose(pred[1], -(0.35922 + 0.71845 * grid[:, 0]), atol=0.06)
  # The fit's defining property: about 90% of the points lie below it.
  assert np.mean(y <= model.predict(features)[0]) == pytest.approx(0.9, abs=0.005)
  assert abs(model.weights[0, 1]) < 0.02
  median = C.fit_quantile_regression(features, y, tau=0.5)
  np.testing.assert_allclose(median.predict(grid)[0], 1 + 2 * grid[:, 0], atol=0.05)


def _config(fraction=0.5):
  c = config_base.base_config()
  c.audit.calibration_fraction = fraction
  c.audit.bootstrap = 0
  return c


def _confounded_table(n=600, seed=1):
  """Scores = difficulty + a small membership signal: difficulty hides membership."""
  rng = np.random.default_rng(seed)
  split = np.repeat(np.array([1, 0], np.int8), n)
  difficulty = rng.uniform(0, 4, 2 * n)
  features = np.stack(
    [difficulty, rng.normal(size=2 * n), rng.normal(size=2 * n), rng.normal(size=2 * n)], axis=1
  )
  score = difficulty + 0.6 * split + 0.1 * rng.normal(size=2 * n)
  return {'split': split, 'score/a': score, 'score/b': rng.normal(size=2 * n)}, features


def test_calibration_removes_difficulty_and_reports_heldout_numbers_only():
  table, features = _confounded_table()
  c = _config()
  out = C.per_image_calibration(c, table, features)
  a = out['a']
  assert a['n_members'] == a['n_nonmembers'] == 300  # the held-out halves
  assert a['fit'] == {
    'n_nonmembers': 300,
    'n_members': 0,
    'images': 'the calibration fraction of the non-members',
  }
  assert a['raw']['auc'] < 0.7 < 0.95 < a['calibrated']['auc']
  assert a['calibrated']['tpr_at_1pct_fpr'] > a['raw']['tpr_at_1pct_fpr'] + 0.3
  assert a['difference']['auc'] == pytest.approx(a['calibrated']['auc'] - a['raw']['auc'])
  # "member iff calibrated > 0" keeps about the target FPR on held-out non-members.
  assert a['at_zero']['fpr'] < 0.04
  # The raw held-out numbers are the plain metrics of the held-out images.
  members = table['split'] == 1
  mh, nh = metrics.calibration_split(600, 600, fraction=0.5, seed=c.seed)
  score = table['score/a']
  assert a['raw']['auc'] == metrics.auc(score[members][mh], score[~members][nh])
  assert abs(out['b']['calibrated']['auc'] - 0.5) < 0.1  # a score without signal stays at chance
  # Paired intervals of the differences: clear for the confounded score, around 0 for noise.
  assert a['difference_ci95'] == {}  # no resamples (bootstrap 0), no intervals
  c.audit.bootstrap = 200
  out = C.per_image_calibration(c, table, features)
  a = out['a']
  lo, hi = a['difference_ci95']['auc']
  assert 0 < lo < a['difference']['auc'] < hi
  assert a['difference_ci95']['tpr_at_1pct_fpr'][0] > 0
  lo, hi = out['b']['difference_ci95']['auc']
  assert lo < 0.05 and hi > -0.05 and lo <= out['b']['difference']['auc'] <= hi


def test_paired_difference_intervals_pair_the_draws():
  rng = np.random.default_rng(0)
  m, n = rng.normal(1, 1, 200), rng.normal(0, 1, 300)
  same = metrics.paired_difference_ci((m, m), (n, n), bootstrap=100)
  assert same == {k: [0.0, 0.0] for k in ('auc', 'tpr_at_1pct_fpr', 'tpr_at_0p1pct_fpr')}
  shifted = metrics.paired_difference_ci((m, m + 0.01), (n, n), bootstrap=200)
  lo, hi = shifted['auc']
  assert 0 <= lo <= hi < 0.02  # a tiny, consistent gain: a narrow interval above 0


def test_the_fit_sees_only_calibration_nonmembers():
  table, features = _confounded_table()
  c = _config()
  ref = C.per_image_calibration(c, table, features)
  members = table['split'] == 1
  _, nh = metrics.calibration_split(600, 600, fraction=0.5, seed=c.seed)
  changed = {k: v.copy() for k, v in table.items()}
  rows_heldout_non = np.flatnonzero(~members)[nh]
  changed['score/a'][members] += 100.0  # every member, calibration members included
  changed['score/a'][rows_heldout_non] -= 100.0
  got = C.per_image_calibration(c, changed, features)
  assert got['a']['weights'] == ref['a']['weights']  # the same fitted model


def test_few_calibration_nonmembers_warn():
  table, features = _confounded_table(n=60)
  out = C.per_image_calibration(_config(0.2), table, features)
  assert any('fitted on 12 non-members' in w for w in out['a']['warnings'])
