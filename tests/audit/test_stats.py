"""drc_jax.audit.stats against hand-computed cases, SciPy, and the values of the hand-written
implementation it replaced."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from drc_jax.audit import stats

# Values of the hand-written implementation (exact integer counts, erfc, bisection) before the
# SciPy version, recorded to full precision: (suspect, reference) -> (U, p, method, p normal).
_S8 = np.sin(np.arange(1, 9) * 1.3) + 0.4  # no ties among the 48 values
_R40 = np.sin(np.arange(1, 41) * 0.7)
_S30 = np.sin(np.arange(1, 31) * 1.1) + 1.5  # no ties among the 230 values
_R200 = np.sin(np.arange(1, 201) * 0.37)
PINNED_RANK_TESTS = [
  (([2.0], [1.0]), (1.0, 0.5, 'exact', 0.5)),
  (([3.0, 4.0], [1.0, 2.0]), (4.0, 0.16666666666666666, 'exact', 0.12263905840338643)),
  # 5/18: 35 of the C(9, 4) = 126 orderings have U >= 13
  (
    ([0.3, 1.7, 2.2, 5.0], [0.1, 0.9, 1.5, 2.0, 3.3]),
    (13.0, 0.2777777777777778, 'exact', 0.27014568730370997),
  ),
  (([0.0, 0.05], [0.1, 0.9, 1.5]), (0.0, 1.0, 'exact', 0.978345928594604)),
  ((_S8, _R40), (210.0, 0.08710670896872724, 'exact', 0.08544084642316467)),  # 3652181/41927666
  ((_S30, _R200), (5535.0, 3.8090196854828794e-18, 'exact', 4.404361391680524e-14)),
  # ties: the exact conditional p-value (counted by hand below or by enumeration in
  # test_exact_ties_p_value_equals_enumeration); the normal approximation with the tie-corrected
  # variance when asked for (p normal)
  # 34 of the C(8, 4) = 70 placements
  (([1.0, 2.0, 2.0, 3.0], [1.0, 1.5, 2.0, 4.0]), (8.5, 34 / 70, 'exact-ties', 0.5)),
  (([1.0, 2.0], [1.0, 3.0]), (1.5, 5 / 6, 'exact-ties', 0.7928919108787374)),
  (([1.0, 1.0], [1.0]), (1.0, 1.0, 'exact-ties', 1.0)),
  (
    ([0, 1, 1, 2, 2, 2, 3, 5], [0, 0, 1, 1, 2, 3, 3, 4, 4, 4]),
    (36.5, 27582 / 43758, 'exact-ties', 0.641109966134092),  # of C(18, 8) = 43758
  ),
]
NORMAL = {'exact_max_work': 0, 'ties_max_work': 0, 'permutations': 0}  # the normal approximation
# (k, n, level) -> the interval, by bisection on the hand-written binomial CDF
PINNED_CLOPPER_PEARSON = [
  ((0, 200, 0.95), (0.0, 0.01827534035513624)),
  ((1, 200, 0.95), (0.0001265810278670179, 0.027541898457205262)),
  ((37, 200, 0.95), (0.13372866017975288, 0.24586346244867768)),
  ((5, 9, 0.95), (0.2120085067788638, 0.8630043377348333)),
  ((10, 10, 0.95), (0.6915028921812372, 1.0)),
  ((3, 7, 0.9), (0.12875639280424211, 0.7746784159675524)),
  ((1, 1, 0.95), (0.024999999999999967, 1.0)),
  ((0, 1, 0.99), (0.0, 0.9950000000000001)),
  ((500, 1000, 0.95), (0.46854917297170806, 0.5314508270282046)),
]
PINNED_BINOM_CDF = [
  ((1, 3, 0.5), 0.5000000000000003),  # (1 + 3) / 8, to rounding
  ((0, 10, 0.1), 0.34867844009999993),
  ((4, 10, 0.3), 0.8497316673999996),
  ((37, 200, 0.2), 0.33453509779673),
  ((199, 200, 0.99), 0.8660203251419936),
  ((5, 9, 0.123456), 0.9997871807378315),
]
PINNED_NORMAL_SF = [
  (-3.0, 0.9986501019683699),
  (0.0, 0.5),
  (0.8165, 0.20710711176496982),
  (5.0, 2.866515718791946e-07),
  (10.0, 7.619853024160593e-24),
]


@pytest.mark.parametrize('samples, want', PINNED_RANK_TESTS)
def test_rank_test_keeps_its_pinned_values(samples, want):
  s, r = samples
  u, p, method, p_normal = want
  t = stats.mann_whitney_greater(s, r)
  assert (t.u, t.method, t.auc) == (u, method, u / (len(s) * len(r)))
  if method == 'exact':  # exact integer counts: the same float to the last bit
    assert t.p_value == p
  else:
    assert t.p_value == pytest.approx(p, rel=1e-12, abs=1e-300)
  a = stats.mann_whitney_greater(s, r, **NORMAL)
  assert (a.u, a.method) == (u, 'normal')
  assert a.p_value == pytest.approx(p_normal, rel=1e-12, abs=1e-300)


def test_clopper_pearson_binomial_and_normal_keep_their_pinned_values():
  for (k, n, level), (lo, hi) in PINNED_CLOPPER_PEARSON:
    got = stats.clopper_pearson(k, n, level)
    assert got == pytest.approx((lo, hi), rel=1e-12, abs=1e-15), (k, n, level)
    assert (got[0] == 0.0) == (k == 0) and (got[1] == 1.0) == (k == n)
  for (k, n, p), want in PINNED_BINOM_CDF:
    assert stats.binom_cdf(k, n, p) == pytest.approx(want, rel=1e-12), (k, n, p)
  for z, want in PINNED_NORMAL_SF:
    assert stats.normal_sf(z) == pytest.approx(want, rel=1e-12), z


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
  t = stats.mann_whitney_greater([1.0, 2.0], [1.0, 3.0], **NORMAL)
  assert t.u == 1.5 and t.method == 'normal'
  assert t.p_value == pytest.approx(0.792892, abs=1e-6)
  assert stats.mann_whitney_greater([1.0, 1.0], [1.0], **NORMAL).p_value == 1.0  # all tied
  # The exact conditional p-value: of the C(4, 2) = 6 ways to place the suspects among the
  # mid-ranks 1.5, 1.5, 3, 4, the rank sums are 3, 4.5, 5.5, 4.5, 5.5, 7: P(W >= 4.5) = 5/6.
  t = stats.mann_whitney_greater([1.0, 2.0], [1.0, 3.0])
  assert (t.u, t.method) == (1.5, 'exact-ties') and t.p_value == pytest.approx(5 / 6, abs=1e-15)


def test_agrees_with_scipy():
  rng = np.random.default_rng(0)
  for n, m in ((1, 50), (5, 40), (20, 300), (40, 250)):
    s, r = rng.normal(0.3, 1, n), rng.normal(0, 1, m)
    t = stats.mann_whitney_greater(s, r)
    ref = scipy.stats.mannwhitneyu(s, r, alternative='greater', method='exact')
    assert t.method == 'exact' and t.u == ref.statistic
    assert t.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    a = stats.mann_whitney_greater(s, r, **NORMAL)
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


def _enumerated_p_value(s, r) -> float:
  """P(U >= u) over every choice of which len(s) of the pooled values are the suspects'."""
  x = np.concatenate([s, r]).astype(np.float64)
  observed = stats.mann_whitney_greater(s, r).u
  hits = total = 0
  for chosen in itertools.combinations(range(len(x)), len(s)):
    mask = np.zeros(len(x), bool)
    mask[list(chosen)] = True
    diff = x[mask][:, None] - x[~mask][None, :]
    hits += np.sum(diff > 0) + 0.5 * np.sum(diff == 0) >= observed
    total += 1
  return hits / total


def test_exact_ties_p_value_equals_enumeration():
  rng = np.random.default_rng(4)
  for n, m in ((2, 3), (3, 5), (5, 3), (4, 4), (1, 6), (6, 1), (3, 7)):
    for _ in range(4):
      s, r = rng.integers(0, 3, n).astype(float), rng.integers(0, 3, m).astype(float)
      if np.unique(np.r_[s, r]).size == n + m:
        continue
      t = stats.mann_whitney_greater(s, r)
      assert t.method == 'exact-ties'
      assert t.p_value == pytest.approx(_enumerated_p_value(s, r), rel=1e-12), (s, r)
  for (s, r), (_, p, method, _) in PINNED_RANK_TESTS:  # the pinned values with ties
    if method == 'exact-ties':
      assert p == pytest.approx(_enumerated_p_value(s, r), rel=1e-12), (s, r)


def test_permutation_p_value_where_the_exact_count_is_too_large():
  rng = np.random.default_rng(5)
  s, r = rng.integers(0, 4, 12).astype(float) + 0.5, rng.integers(0, 4, 60).astype(float)
  exact = stats.mann_whitney_greater(s, r)
  perm = stats.mann_whitney_greater(s, r, ties_max_work=0)
  assert (exact.method, perm.method) == ('exact-ties', 'permutation') and perm.u == exact.u
  # (1 + hits) / (1 + B): a multiple of 1 / 20,001, within Monte Carlo error of the exact value
  b = stats.PERMUTATIONS
  assert round(perm.p_value * (1 + b)) == pytest.approx(perm.p_value * (1 + b), abs=1e-6)
  assert perm.p_value == pytest.approx(exact.p_value, abs=4 * np.sqrt(exact.p_value / b) + 1e-4)
  assert stats.mann_whitney_greater(s, r, ties_max_work=0) == perm  # a fixed seed
  # More references than suspects or the reverse: the smaller side is drawn, same answer.
  swapped = stats.mann_whitney_greater(-r, -s, ties_max_work=0)
  assert swapped.method == 'permutation'
  assert swapped.p_value == pytest.approx(exact.p_value, abs=4 * np.sqrt(exact.p_value / b) + 1e-4)
  assert stats.mann_whitney_greater(-r, -s).p_value == pytest.approx(exact.p_value, rel=1e-12)
  # Every suspect above every reference: the smallest p a permutation test reaches is 1 / (1 + B).
  top = stats.mann_whitney_greater([9.0, 9.0, 9.0], [0.0] * 200 + [1.0], ties_max_work=0)
  assert top.p_value == 1 / (1 + b)


def test_false_positive_rate_with_ties_is_at_most_alpha():
  # Two suspects against 50 references, scores on three levels (probabilities 0.9, 0.05, 0.05),
  # every image drawn alike (the null hypothesis). The normal approximation rejects at alpha = 0.05
  # about 11% of the time (0.1095 by enumeration of the level counts); the exact conditional
  # p-values reject at alpha = 0.01 with a Clopper-Pearson upper bound below 0.01.
  rng = np.random.default_rng(6)
  reps, levels = 5000, rng.choice(3, size=(5000, 52), p=[0.9, 0.05, 0.05]).astype(float)
  new, normal = np.empty(reps), np.empty(reps)
  for i, x in enumerate(levels):
    t = stats.mann_whitney_greater(x[:2], x[2:])
    assert t.method in ('exact', 'exact-ties')
    new[i] = t.p_value
    normal[i] = stats.mann_whitney_greater(x[:2], x[2:], **NORMAL).p_value
  k = int(np.sum(new < 0.01))
  assert stats.clopper_pearson(k, reps)[1] < 0.01, k
  assert stats.clopper_pearson(int(np.sum(new < 0.05)), reps)[1] < 0.05
  lower, _ = stats.clopper_pearson(int(np.sum(normal < 0.05)), reps)
  assert lower > 0.09, np.mean(normal < 0.05)  # anti-conservative: about twice alpha
