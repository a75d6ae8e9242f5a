"""The near-copy test with a stated false-positive rate, on real Fashion-MNIST images."""

import numpy as np
import pytest

from drc_jax.audit import samples as S
from drc_jax.data import sources as D


def _real(n, offset=0):
  raw, _ = D.FashionMnistSource('train').read(np.arange(offset, offset + n))
  x = raw.astype(np.float64) / 127.5 - 1.0
  return x[:, ::2, ::2]  # 14x14: the shipped target's scale of detail


def test_the_calibrated_threshold_passes_at_most_the_stated_share():
  ratios = np.random.default_rng(0).uniform(size=1000)
  alpha = S.calibrated_alpha(ratios, 0.01)
  assert np.sum(ratios < alpha) == 10
  assert S.calibrated_alpha(ratios[:199], 0.01) == np.sort(ratios[:199])[1]  # floor(1.99) = 1


def test_real_unseen_images_pass_the_calibrated_rule_rarely_and_carlinis_often():
  members, calibration, heldout = _real(256), _real(200, 1000), _real(800, 2000)
  copies = members[:64] + np.random.default_rng(1).normal(0, 0.01, members[:64].shape)
  figures, _, _, is_copy = S.quality(copies, members, heldout, calibration)
  copy, carlini = figures['near_copy'], figures['near_copy_carlini']
  assert copy['heldout_nonmembers']['rate'] <= 0.02  # the floor, on images that set nothing
  assert copy['heldout_nonmembers']['n'] == 800 and copy['n_calibration_nonmembers'] == 200
  assert carlini['heldout_nonmembers']['rate'] > 0.1  # the fixed rule's floor on real images
  assert copy['samples']['rate'] == 1.0 and is_copy.all()  # true near-copies all pass
  real = figures['real_vs_real']
  assert real['n'] == 64 and 0.5 < real['precision'] <= 1.0 and 0.5 < real['recall'] <= 1.0
  # unseen real images as 'samples': they pass about as often as the floor
  figures, *_ = S.quality(_real(256, 5000), members, heldout, calibration)
  assert figures['near_copy']['samples']['rate'] <= 0.03
  assert 'real held-out non-members' in S.format_line(figures)


@pytest.mark.parametrize('n', [1, 50])
def test_copy_ratio_is_carlinis_statistic(n):
  rng = np.random.default_rng(0)
  members = rng.normal(size=(60, 4, 4, 1))
  x = rng.normal(size=(5, 4, 4, 1))
  ratio, nearest, d = S.copy_ratio(x, members, n)
  dist = np.sqrt(((x.reshape(5, 1, -1) - members.reshape(1, 60, -1)) ** 2).mean(-1))
  order = np.sort(dist, axis=1)
  np.testing.assert_allclose(ratio, order[:, 0] / order[:, :n].mean(axis=1))
  np.testing.assert_array_equal(nearest, dist.argmin(axis=1))
  np.testing.assert_allclose(d, order[:, 0])
