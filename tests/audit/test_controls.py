"""The blind baseline: image statistics only, fit on the calibration part; it fires on a shifted
split (members and non-members of different kinds) and stays silent on an exchangeable one."""

import json

import numpy as np
import pytest
from conftest import load_config

from drc_jax.audit import controls, metrics, modes
from drc_jax.data import sources as D


def _blind_auc(member_images, nonmember_images, seed=0):
  x = np.concatenate([member_images, nonmember_images])
  is_member = np.r_[np.ones(len(member_images)), np.zeros(len(nonmember_images))].astype(bool)
  mh, nh = metrics.calibration_split(
    len(member_images), len(nonmember_images), fraction=0.2, seed=seed
  )
  heldout = np.r_[mh, nh]
  s = controls.blind_scores(controls.blind_features(x), is_member, ~heldout)
  return metrics.attack_metrics(s[is_member & heldout], s[~is_member & heldout], bootstrap=200)


def _fashion(labels, n, offset=0):
  raw, lab = D.FashionMnistSource('train').read(np.arange(6000))
  idx = np.flatnonzero(np.isin(lab, labels))[offset : offset + n]
  return raw[idx].astype(np.float32) / 127.5 - 1.0


def test_fires_on_a_class_shifted_split_and_not_on_an_exchangeable_one():
  shifted = _blind_auc(_fashion([0, 1, 2, 3, 4], 200), _fashion([5, 6, 7, 8, 9], 400))
  assert shifted['auc'] > 0.8 and controls.shift_warning(shifted) is not None
  assert 'members and non-members differ without the model' in controls.shift_warning(shifted)
  every = list(range(10))
  fair = _blind_auc(_fashion(every, 200), _fashion(every, 400, offset=200))
  assert fair['ci95']['auc'][0] < 0.5 or fair['auc'] < controls.SHIFT_AUC, fair
  assert controls.shift_warning(fair) is None


def test_logistic_fit_is_the_penalised_optimum():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 3)) + np.r_[np.ones((100, 3)), np.zeros((200, 3))] * [1, 0, 0]
  y = np.r_[np.ones(100), np.zeros(200)]
  mean, scale, beta = controls.fit_logistic(x, y)
  z = np.concatenate([(x - mean) / scale, np.ones((300, 1))], axis=1)
  w = np.where(y == 1, 0.5 / 100, 0.5 / 200)
  p = 1 / (1 + np.exp(-z @ beta))
  penalty = np.r_[np.full(3, controls.L2 / 300), 0.0]
  np.testing.assert_allclose(z.T @ (w * (p - y)) + penalty * beta, 0, atol=1e-10)
  assert beta[0] > 0.5 and abs(beta[1]) < 0.3  # the informative feature carries the weight


def test_features_are_image_statistics_only():
  images = np.zeros((2, 16, 16, 1))
  images[1, 4:12, 4:12] = 1.0
  f = controls.blind_features(images)
  assert f.shape == (2, 4 + controls.HISTOGRAM_BINS + controls.THUMBNAIL**2)
  assert f[0, 4:12].sum() == pytest.approx(1.0) and f[0, 12:].max() == 0.0  # all mid-grey
  assert f[1, -(controls.THUMBNAIL**2) :].max() == pytest.approx(1.0)


def test_the_shifted_variant_audits_end_to_end_and_every_output_warns(tmp_path, capsys):
  """configs/fashion_mnist.py:runlocal,shifted: the blind baseline fires; terminal, metrics.json
  and the report's first lines say the attacks' figures are not evidence of membership."""
  wd = str(tmp_path / 'w')
  metrics_out = modes.run(load_config('fashion_mnist', 'runlocal,shifted'), wd, 'all')
  blind = metrics_out['blind']
  assert blind['auc'] > 0.8 and blind['ci95']['auc'][0] > 0.5, blind['auc']
  split = json.loads(open(f'{wd}/split.json').read())
  assert split['classes'] == '0,1,2,3,4|5,6,7,8,9'
  saved = json.loads(open(f'{wd}/metrics.json').read())
  for name, m in saved.items():
    assert m['warnings'][0].startswith('members and non-members differ without the model'), name
  out = capsys.readouterr().out
  assert 'note (all attacks): members and non-members differ without the model' in out
  assert 'verdict: Smoke run' in out or 'verdict: The evaluation is not valid' in out
  page = open(f'{wd}/report.html').read()
  verdict = page[page.index('id="verdict"') : page.index('</section>')]
  assert verdict.index('Smoke run') < verdict.index('The evaluation is not valid as it stands')
  assert page.index('The evaluation is not valid') < page.index('<h2>Metrics')
