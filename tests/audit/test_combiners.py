"""Dataset inference's combiners: the label-free default by hand, its independence of member
labels, its validity and power on synthetic scores, and the records dataset.json keeps."""

import numpy as np
import pytest

from drc_jax.audit import combiners, stats
from drc_jax.audit import dataset_inference as DI

NAMES = ('a', 'b', 'c')


def _scores(rng, n, shift=0.0):
  # Three attacks on different scales, members higher on each (by `shift` standard deviations).
  return (rng.normal(size=(n, 3)) + shift) * [1.0, 50.0, 1e-4] + [0.0, -20.0, 3e-4]


def test_zsum_by_hand():
  ref = np.array([[0.0, 10.0], [2.0, 30.0], [4.0, 20.0]])  # means 2, 20; sd (ddof 1) 2, 10
  c = combiners.fit_zsum(ref, ['x', 'y'])
  assert (c.kind, c.bias) == ('zsum', 0.0)
  np.testing.assert_array_equal(c.weights, [1.0, 1.0])
  np.testing.assert_allclose(c.mean, [2.0, 20.0])
  np.testing.assert_allclose(c.scale, [2.0, 10.0])
  np.testing.assert_allclose(c.score([[4.0, 40.0], [2.0, 20.0], [0.0, 30.0]]), [3.0, 0.0, 0.0])
  # A score constant over the reference, or one reference image, is centred, not scaled.
  one = combiners.fit_zsum([[1.0, 5.0]], ['x', 'y'])
  np.testing.assert_allclose(one.score([[2.0, 8.0]]), [4.0])
  with pytest.raises(ValueError, match='reference features must be'):
    combiners.fit_zsum(np.zeros((0, 2)), ['x', 'y'])


def test_the_default_combiner_ignores_member_labels():
  rng = np.random.default_rng(0)
  members, ref_fit = _scores(rng, 40, shift=1.0), _scores(rng, 60)
  suspect, reference = _scores(rng, 20, shift=1.0), _scores(rng, 200)
  fitted = combiners.fit(combiners.ZSUM, members, ref_fit, NAMES)
  # Permuted members, other members, or none at all: the same combiner, the same test.
  for other in (members[::-1], _scores(rng, 7, shift=-3.0), None):
    again = combiners.fit(combiners.ZSUM, other, ref_fit, NAMES)
    for field in ('mean', 'scale', 'weights'):
      np.testing.assert_array_equal(getattr(again, field), getattr(fitted, field))
    assert DI.compare_sets(suspect, reference, again, 0.01) == DI.compare_sets(
      suspect, reference, fitted, 0.01
    )
  # The member-label combiner does read them: other members, other weights.
  labels = combiners.fit(combiners.MEMBER_LABELS, members, ref_fit, NAMES)
  flipped = combiners.fit(combiners.MEMBER_LABELS, _scores(rng, 40, shift=-1.0), ref_fit, NAMES)
  assert labels.kind == 'member_labels' and np.all(labels.weights > 0)
  assert np.all(flipped.weights < 0)
  with pytest.raises(ValueError, match="combiner kind 'logistic' not in"):
    combiners.fit('logistic', members, ref_fit, NAMES)


def test_zsum_detects_a_member_set_and_keeps_its_false_positive_rate():
  rng = np.random.default_rng(1)
  combiner = combiners.fit_zsum(_scores(rng, 100), NAMES)
  reference = _scores(rng, 400)
  # 20 members shifted by half a standard deviation on each attack: detected.
  found = DI.compare_sets(_scores(rng, 20, shift=0.5), reference, combiner, 0.01)['combined']
  assert found['reject'] and found['p_value'] < 1e-3
  # Non-member sets: the rate is at most alpha within its interval (the combiner saw no suspect
  # and no test reference); power grows with the set size.
  power = DI.power_curve(
    _scores(rng, 100, shift=0.5),
    reference,
    combiner,
    sizes=(1, 5, 20),
    repetitions=400,
    alpha=0.05,
    seed=0,
  )
  for lo, _ in power['nonmembers']['combined']['ci95']:
    assert lo <= 0.05
  tpr = power['members']['combined']['rate']
  assert tpr[0] < tpr[1] < tpr[2] and tpr[2] > 0.9


def test_records_say_whether_member_labels_were_used():
  rng = np.random.default_rng(2)
  zsum = combiners.fit_zsum(_scores(rng, 30), NAMES)
  rec = combiners.record(zsum, 12, 30, 'the reference (no member label, no member)')
  assert rec == {
    'kind': 'zsum',
    'uses_member_labels': False,
    'features': list(NAMES),
    'weights': {'a': 1.0, 'b': 1.0, 'c': 1.0},
    'fit': {'n_members': 0, 'n_nonmembers': 30},
    'standardized_by': 'the reference (no member label, no member)',
  }
  assert not combiners.uses_member_labels(rec)
  assert 'uses no member labels' in combiners.describe(rec)
  labels = combiners.fit_logistic(_scores(rng, 12, shift=1.0), _scores(rng, 30), NAMES)
  rec = combiners.record(labels, 12, 30, 'members and reference')
  assert (rec['kind'], rec['uses_member_labels'], rec['fit']['n_members']) == (
    'member_labels',
    True,
    12,
  )
  assert 'USES MEMBER LABELS' in combiners.describe(rec)
  # A record of an earlier drc_jax: the logistic regression on member labels, no flag.
  old = {'kind': 'logistic', 'l2': 0.01, 'weights': {'a': 0.5}, 'fit': {'n_members': 6}}
  assert combiners.uses_member_labels(old) and 'USES MEMBER LABELS' in combiners.describe(old)


def test_repetitions_to_show_a_rate_at_most_alpha():
  for alpha in (0.01, 0.05, 0.1):
    n = stats.repetitions_to_show(alpha)
    assert stats.clopper_pearson(0, n)[1] <= alpha < stats.clopper_pearson(0, n - 1)[1]
  assert stats.repetitions_to_show(0.01) == 368
  assert stats.false_positive_check(0, 368, 0.01)['status'] == 'shown'
  assert stats.false_positive_check(0, 367, 0.01)['status'] == 'too few repetitions'
  assert stats.false_positive_check(4, 400, 0.01)['status'] == 'not shown'
  check = stats.false_positive_check(20, 400, 0.01)
  assert check['status'] == 'exceeds alpha' and not check['within_alpha']
  assert check['upper'] == stats.clopper_pearson(20, 400)[1]
