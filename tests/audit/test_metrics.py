"""Tests of drc_jax.audit.metrics against hand-computed cases."""

import numpy as np
import pytest

from drc_jax.audit import metrics

# A small case with ties, worked out by hand (higher = member, member iff score >= threshold):
#   threshold  inf   3     2     1     0
#   TP         0     1     3     4     4     (of P = 4)
#   FP         0     0     1     3     4     (of N = 4)
MEMBERS = [3.0, 2.0, 2.0, 1.0]
NONMEMBERS = [2.0, 1.0, 1.0, 0.0]


def test_roc_curve_hand_case_with_ties():
  fpr, tpr, thresholds = metrics.roc_curve(MEMBERS, NONMEMBERS)
  np.testing.assert_array_equal(thresholds, [np.inf, 3.0, 2.0, 1.0, 0.0])
  np.testing.assert_array_equal(tpr, [0.0, 0.25, 0.75, 1.0, 1.0])
  np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.25, 0.75, 1.0])


def test_auc_asr_hand_case_with_ties():
  # Mann-Whitney: member 3 beats 4; each member 2 beats 3 and ties 1 (3.5 each); member 1 beats 1
  # and ties 2 (2). U = 4 + 7 + 2 = 13 of 16 pairs.
  assert metrics.auc(MEMBERS, NONMEMBERS) == 13 / 16
  # Correct predictions per threshold: TP + (N - FP) = 4, 5, 6, 5, 4 of 8.
  assert metrics.asr(MEMBERS, NONMEMBERS) == 6 / 8


def test_tpr_at_fpr_does_not_use_the_point_just_above_the_bound():
  fpr, tpr, _ = metrics.roc_curve(MEMBERS, NONMEMBERS)
  assert metrics.tpr_at_fpr(fpr, tpr, 0.25) == 0.75  # The point (0.25, 0.75) qualifies.
  assert metrics.tpr_at_fpr(fpr, tpr, 0.24) == 0.25  # It does not: no interpolation either.
  assert metrics.tpr_at_fpr(fpr, tpr, 0.0) == 0.25
  assert metrics.tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_perfect_separation():
  members, nonmembers = [5.0, 6.0, 7.0], [1.0, 2.0, 3.0]
  out = metrics.attack_metrics(members, nonmembers, bootstrap=0)
  assert out['auc'] == 1.0
  assert out['asr'] == 1.0
  assert out['tpr_at_1pct_fpr'] == 1.0
  assert out['tpr_at_0p1pct_fpr'] == 1.0
  assert out['n_members'] == 3 and out['n_nonmembers'] == 3
  assert out['ci95'] == {}


def test_inverted_separation():
  members, nonmembers = [1.0, 2.0, 3.0], [5.0, 6.0, 7.0]
  assert metrics.auc(members, nonmembers) == 0.0
  assert metrics.asr(members, nonmembers) == 0.5  # Best is a trivial all-one-class rule.
  fpr, tpr, _ = metrics.roc_curve(members, nonmembers)
  assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.0


def test_all_tied():
  fpr, tpr, thresholds = metrics.roc_curve([1.0, 1.0], [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(fpr, [0.0, 1.0])
  np.testing.assert_array_equal(tpr, [0.0, 1.0])
  np.testing.assert_array_equal(thresholds, [np.inf, 1.0])
  assert metrics.auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
  assert metrics.asr([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5  # balanced: no trivial-rule bonus


def test_auc_equals_mann_whitney_and_trapezoid_on_random_ties():
  rng = np.random.default_rng(0)
  for _ in range(5):
    members = rng.integers(0, 8, size=rng.integers(1, 60)).astype(float) + 1.0
    nonmembers = rng.integers(0, 8, size=rng.integers(1, 60)).astype(float)
    diff = members[:, None] - nonmembers[None, :]
    mann_whitney = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    fpr, tpr, _ = metrics.roc_curve(members, nonmembers)
    trapezoid = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert metrics.auc(members, nonmembers) == pytest.approx(mann_whitney, abs=1e-12)
    assert trapezoid == pytest.approx(mann_whitney, abs=1e-12)
    # ASR (best balanced accuracy) agrees with brute force over every score as a threshold.
    accuracies = [
      ((members >= t).mean() + (nonmembers < t).mean()) / 2
      for t in np.concatenate([members, nonmembers, [np.inf]])
    ]
    assert metrics.asr(members, nonmembers) == pytest.approx(max(accuracies))


def test_resampled_metrics_with_unit_counts_match_point_estimates():
  rng = np.random.default_rng(1)
  members = np.round(rng.normal(0.5, 1.0, 300), 1)
  nonmembers = np.round(rng.normal(0.0, 1.0, 400), 1)
  values = np.unique(np.concatenate([members, nonmembers]))
  counts = [
    np.bincount(np.searchsorted(values, x), minlength=values.size)[None]
    for x in (members, nonmembers)
  ]
  resampled = metrics._resampled_metrics(counts[0], counts[1], (0.01, 0.001))
  point = metrics.attack_metrics(members, nonmembers, bootstrap=0)
  for name in ('auc', 'asr', 'tpr_at_1pct_fpr', 'tpr_at_0p1pct_fpr'):
    assert resampled[name][0] == pytest.approx(point[name], abs=1e-12)


def test_bootstrap_interval_contains_point_estimate_and_is_seeded():
  rng = np.random.default_rng(2)
  members, nonmembers = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 500)
  out = metrics.attack_metrics(members, nonmembers, bootstrap=1000, seed=3)
  for name in ('auc', 'asr', 'tpr_at_1pct_fpr'):
    lo, hi = out['ci95'][name]
    assert lo <= out[name] <= hi
    assert lo < hi
  again = metrics.attack_metrics(members, nonmembers, bootstrap=1000, seed=3)
  assert again['ci95'] == out['ci95']


def test_warnings_for_few_expected_false_positives():
  rng = np.random.default_rng(4)
  small = metrics.attack_metrics(rng.normal(size=50), rng.normal(size=500), bootstrap=0)
  assert any(
    'TPR@0.1%FPR' in w and '0.5 expected' in w and '500 non-members' in w for w in small['warnings']
  )
  large = metrics.attack_metrics(rng.normal(size=50), rng.normal(size=5000), bootstrap=0)
  assert not any('TPR@1%FPR' in w for w in large['warnings'])
  assert any('TPR@0.1%FPR' in w for w in large['warnings'])  # 5000 * 0.001 = 5 < 10.


def test_invalid_scores_raise():
  with pytest.raises(ValueError, match='2 NaN'):
    metrics.attack_metrics([1.0, np.nan, np.nan], [0.0])
  with pytest.raises(ValueError, match='empty'):
    metrics.auc([], [1.0])
  with pytest.raises(ValueError, match='empty'):
    metrics.attack_metrics([1.0], [])


def test_calibrate_separable_case_has_heldout_accuracy_one():
  rng = np.random.default_rng(5)
  members, nonmembers = rng.normal(10.0, 1.0, 200), rng.normal(0.0, 1.0, 200)
  out = metrics.calibrate(members, nonmembers, fraction=0.25, seed=0)
  assert out['accuracy'] == 1.0 and out['tpr'] == 1.0 and out['fpr'] == 0.0
  assert out['calibration'] == {'n_members': 50, 'n_nonmembers': 50, 'accuracy': 1.0}
  assert out['n_members'] == out['member_heldout'].sum() == 150
  assert out['n_nonmembers'] == out['nonmember_heldout'].sum() == 150
  assert nonmembers.max() < out['threshold'] <= members.min()
  # Held-out figures come with 95% intervals: 150 of 150 is not a certainty.
  lo, hi = out['ci95']['tpr']
  assert hi == 1.0 and 0.97 < lo < 1.0
  assert out['ci95']['fpr'] == metrics.wilson_interval(0, 150)
  assert out['ci95']['accuracy'][0] < 1.0 == out['ci95']['accuracy'][1]


def test_intervals_by_hand():
  # Wilson, 0 of 10: [0, z^2/n / (1 + z^2/n)] = [0, 0.3841/1.3841].
  lo, hi = metrics.wilson_interval(0, 10)
  assert lo == 0.0 and abs(hi - 0.27754) < 1e-4
  lo, hi = metrics.wilson_interval(5, 10)  # symmetric around 1/2
  assert abs(lo + hi - 1.0) < 1e-12 and abs(hi - 0.76335) < 1e-4
  # Agresti-Caffo: TPR 8/10, FPR 2/10 -> p1 = 9/12, p2 = 3/12, se = sqrt(2 * 0.1875 / 12).
  lo, hi = metrics.balanced_accuracy_interval(8, 10, 2, 10)
  se = np.sqrt(2 * 0.75 * 0.25 / 12)
  assert abs(lo - (1.5 - 1.959964 * se) / 2) < 1e-6 and abs(hi - (1.5 + 1.959964 * se) / 2) < 1e-6


def test_calibrate_threshold_reproduces_best_calibration_accuracy():
  rng = np.random.default_rng(6)
  members = np.round(rng.normal(0.5, 1.0, 101), 1)
  nonmembers = np.round(rng.normal(0.0, 1.0, 80), 1)
  out = metrics.calibrate(members, nonmembers, fraction=0.5, seed=7)
  cal_members = members[~out['member_heldout']]
  cal_nonmembers = nonmembers[~out['nonmember_heldout']]
  assert out['calibration']['accuracy'] == pytest.approx(metrics.asr(cal_members, cal_nonmembers))
  held = members[out['member_heldout']]
  assert out['tpr'] == pytest.approx(np.mean(held >= out['threshold']))
  again = metrics.calibrate(members, nonmembers, fraction=0.5, seed=7)
  np.testing.assert_array_equal(again['member_heldout'], out['member_heldout'])
  for fraction in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match='fraction'):
      metrics.calibrate(members, nonmembers, fraction=fraction, seed=0)


def test_agree_curve_hand_case():
  # a = 1: TP 3 (votes 3, 3, 2), FP 2 (votes 1, 2); a = 2: TP 3, FP 1; a = 3: TP 2, FP 0.
  out = metrics.agree_curve([3, 3, 2, 0], [1, 0, 0, 2], k=3)
  assert out['agree'] == [1, 2, 3] and (out['n_members'], out['n_nonmembers']) == (4, 4)
  assert out['precision'] == [3 / 5, 3 / 4, 1.0]
  assert out['recall'] == [3 / 4, 3 / 4, 2 / 4]
  # Nothing reaches 3 votes: precision is undefined there and reported as None.
  out = metrics.agree_curve([2, 1], [0, 1], k=3)
  assert out['precision'] == [2 / 3, 1.0, None]
  assert out['recall'] == [1.0, 0.5, 0.0]
  with pytest.raises(ValueError, match=r'\[0, 3\]'):
    metrics.agree_curve([4], [0], k=3)


def test_percentile_among():
  reference = [2.0, 1.0, 1.0, 0.0]
  # 2.0: 3 below, 1 tied -> 3.5 / 4; 1.0: 1 below, 2 tied -> 2 / 4; -1.0: none; 5.0: all.
  np.testing.assert_array_equal(
    metrics.percentile_among([2.0, 1.0, -1.0, 5.0], reference), [87.5, 50.0, 0.0, 100.0]
  )


def test_tpr_metric_name():
  assert metrics.tpr_metric_name(0.01) == 'tpr_at_1pct_fpr'
  assert metrics.tpr_metric_name(0.001) == 'tpr_at_0p1pct_fpr'
  assert metrics.tpr_metric_name(0.05) == 'tpr_at_5pct_fpr'
