"""drc_jax.audit.stats against hand-computed cases (and SciPy, present as a JAX dependency)."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from drc_jax.audit import stats


def test_exact_p_values_by_hand():
  # Both suspects above both references: 1 of the C(4, 2) = 6 equally likely orderings.
  t = stats.mann_whitney_greater([3.0, 4.0], [1.0, 2.0])
  assert (t.u, t.method, t.auc) == (4.0, 'exact', 1.0)
  assert t.p_value == pytest.approx(1 / 6, abs=1e-15)
  # One suspect among three references: U is uniform on {0, 1, 2, 3}; U = 1 -> P(U >= 1) = 3/4.
  t = stats.mann_whitney_greater([1.5], [1.0, 2.0, 3.0])
  assert t.u == 1.0 and t.p_value == 0.75 and t.n_suspect == 1 and t.n_reference == 3
  # n = 2, m = 3: the counts of U = 0..6 are 1, 1, 2, 2, 2, 1, 1 (the coefficients of the
  # Gaussian binomial [5 choose 2]_q); U = 5 -> (1 + 1) / 10.
  t = stats.mann_whitney_greater([2.5, 9.0], [1.0, 2.0, 3.0])
  assert t.u == 5.0 and t.p_value == pytest.approx(2 / 10, abs=1e-15)
  tail, total = stats._exact_upper_tail(2, 3)
  assert total == 10 and list(tail) == [10, 9, 8, 6, 4, 2, 1]
  # Below every reference: p = 1.
  assert stats.mann_whitney_greater([0.0], [1.0, 2.0]).p_value == 1.0


def test_exact_null_distribution_equals_enumeration():
  # Every way of choosing which 3 of 7 ranks are the suspects' is equally likely under the null.
  n, m = 3, 4
  counts = np.zeros(n * m + 1, dtype=np.int64)
  for suspects in itertools.combinations(range(n + m), n):
    ranks = np.array(suspects)  # 0-based ranks: U = sum of ranks - n (n - 1) / 2
    counts[ranks.sum() - n * (n - 1) // 2] += 1
  tail, total = stats._exact_upper_tail(n, m)
  assert total == math.comb(7, 3)
  np.testing.assert_array_equal(np.array(tail), np.cumsum(counts[::-1])[::-1])
  assert stats._exact_upper_tail(4, 3) == stats._exact_upper_tail(3, 4)  # symmetric in n, m


def test_normal_approximation_with_ties_by_hand():
  # Combined [1, 1, 2, 3], midranks 1.5, 1.5, 3, 4; suspects {1, 2}: W = 4.5, U = 4.5 - 3 = 1.5.
  # var = n m / 12 * (N + 1 - sum(t^3 - t) / (N (N - 1))) = 4/12 * (5 - 6/12) = 1.5;
  # z = (1.5 - 2 - 0.5) / sqrt(1.5); p = 1 - Phi(z) = Phi(0.81650) = 0.79289.
  t = stats.mann_whitney_greater([1.0, 2.0], [1.0, 3.0])
  assert t.u == 1.5 and t.method == 'normal'
  assert t.p_value == pytest.approx(0.792892, abs=1e-6)
  assert stats.mann_whitney_greater([1.0, 1.0], [1.0]).p_value == 1.0  # all tied


def test_agrees_with_scipy():
  rng = np.random.default_rng(0)
  for n, m in ((1, 50), (5, 40), (20, 300), (40, 250)):
    s, r = rng.normal(0.3, 1, n), rng.normal(0, 1, m)
    t = stats.mann_whitney_greater(s, r)
    ref = scipy.stats.mannwhitneyu(s, r, alternative='greater', method='exact')
    assert t.method == 'exact' and t.u == ref.statistic
    assert t.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    a = stats.mann_whitney_greater(s, r, exact_max_work=0)
    ref = scipy.stats.mannwhitneyu(s, r, alternative='greater', method='asymptotic')
    assert a.method == 'normal' and a.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_false_positive_rate_on_null_data_is_at_most_alpha():
  # Suspect and reference drawn from one distribution: the exact test rejects at most alpha of the
  # time; the observed rate over 2,000 draws must have alpha inside or above its 95% interval.
  rng = np.random.default_rng(1)
  alpha, reps = 0.05, 2000
  for n in (1, 5, 30):
    rejections = sum(
      stats.mann_whitney_greater(rng.normal(size=n), rng.normal(size=60)).p_value < alpha
      for _ in range(reps)
    )
    lower, _ = stats.clopper_pearson(rejections, reps)
    assert lower <= alpha, (n, rejections / reps)
  # And it has power: a shift of one standard deviation with 30 suspects is found every time.
  assert stats.mann_whitney_greater(rng.normal(1, 1, 30), rng.normal(size=200)).p_value < 1e-4


def test_clopper_pearson_by_hand_and_against_beta_quantiles():
  # k = 0: the upper end solves (1 - p)^n = 0.025; k = n: the lower end solves p^n = 0.025.
  lo, hi = stats.clopper_pearson(0, 200)
  assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 200), abs=1e-12)
  lo, hi = stats.clopper_pearson(10, 10)
  assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), abs=1e-12)
  for k, n in ((1, 200), (2, 200), (37, 200), (5, 9)):
    lo, hi = stats.clopper_pearson(k, n)
    assert lo == pytest.approx(scipy.stats.beta.ppf(0.025, k, n - k + 1), abs=1e-10)
    assert hi == pytest.approx(scipy.stats.beta.ppf(0.975, k + 1, n - k), abs=1e-10)
  assert stats.binom_cdf(1, 3, 0.5) == pytest.approx(0.5)  # (1 + 3) / 8
  with pytest.raises(ValueError, match='0 <= k <= n'):
    stats.clopper_pearson(3, 2)


def test_bad_samples_raise():
  with pytest.raises(ValueError, match='suspect must be a non-empty'):
    stats.mann_whitney_greater([], [1.0])
  with pytest.raises(ValueError, match='reference has 1 non-finite'):
    stats.mann_whitney_greater([1.0], [np.nan, 2.0])
