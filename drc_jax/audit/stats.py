"""Small statistics for dataset inference: a one-sided rank test and binomial intervals.

SciPy computes them, except the exact null distribution of the rank test (why: below); checked in
``tests/audit/test_stats.py`` against hand-computed cases and the values of the former hand-written
implementation.

* ``mann_whitney_greater(suspect, reference)``: the one-sided Mann-Whitney U (Wilcoxon rank-sum)
  test of "suspect scores tend to be higher than reference scores". Without ties, and when the
  computation is small enough (``EXACT_MAX_WORK``), the p-value is exact: the null distribution of
  U is counted with Python integers from the Gaussian binomial coefficient
  ``[n + m choose n]_q = prod_{i=1..n} (1 - q^(m+i)) / (1 - q^i)``, whose coefficient of ``q^u`` is
  the number of orderings with U = u. Otherwise it is SciPy's normal approximation
  (``scipy.stats.mannwhitneyu(method='asymptotic')``: the tie correction of the variance and a
  continuity correction of 1/2; ``method='normal'`` here).
  Under the null hypothesis that the two sets are exchangeable (for example: both drawn at random
  from the same pool of non-members, scored by a fixed function), the exact p-value satisfies
  P(p <= alpha) <= alpha for every alpha.
* ``clopper_pearson(k, n)``: the exact (conservative) binomial confidence interval, from SciPy's
  beta quantiles.

Why not ``scipy.stats.mannwhitneyu(method='exact')``: it computes the same P(U >= u) (without
ties), but by a floating-point recurrence whose cost grows as (n m)^2 rather than
min(n, m)^2 max(n, m): 10 suspects against 10,000 references took 52 s there against 0.2 s here
(20 against 20,000: over 4 minutes against 3 s), 100 against 800 5.5 s against 1.9 s, and its
p-values are off by up to 1e-12 relatively, where these are exact to the last bit. And with ties
its exact method counts orderings as if there were none; this module then uses the normal
approximation, which corrects for them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.stats

# The exact null distribution costs about min(n, m)^2 * max(n, m) integer additions; above this
# the normal approximation is used (n = 100 suspects against m = 800 references is 8e6: ~1 s).
EXACT_MAX_WORK = 10_000_000


@dataclasses.dataclass(frozen=True)
class RankTest:
  """A one-sided Mann-Whitney U test (higher = the alternative).

  Attributes:
    u: U = #{(s, r): s > r} + #{(s, r): s = r} / 2 over suspect s and reference r.
    p_value: P(U >= u) under the null hypothesis (exact or normal approximation).
    method: 'exact' or 'normal'.
    auc: U / (n * m), the probability that a suspect scores above a reference (ties 1/2).
    n_suspect: n.
    n_reference: m.
  """

  u: float
  p_value: float
  method: str
  auc: float
  n_suspect: int
  n_reference: int


def _as_sample(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f'{name} must be a non-empty 1-D array, got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} has {int(np.sum(~np.isfinite(x)))} non-finite value(s)')
  return x


@functools.lru_cache(maxsize=64)
def _exact_upper_tail(n: int, m: int) -> tuple[tuple[int, ...], int]:
  """(tail, total): tail[u] = #orderings with U >= u (u = 0..n*m), total = C(n + m, n)."""
  k, big = min(n, m), max(n, m)  # U of (n, m) and of (m, n) have the same distribution
  counts = np.zeros(k * big + 1, dtype=object)
  counts[:] = 0
  counts[0] = 1
  degree = 0
  for i in range(1, k + 1):
    # Multiply by (1 - q^(big + i)), then divide by (1 - q^i); the quotient is a polynomial of
    # degree degree + big with non-negative integer coefficients, and coefficient j of a power
    # series quotient depends only on coefficients <= j, so truncating at the new degree is exact.
    new_degree = degree + big
    product = counts[: new_degree + 1].copy()
    shift = big + i
    if shift <= new_degree:
      product[shift:] -= counts[: new_degree + 1 - shift]
    length = new_degree + 1
    padded = np.concatenate([product, np.zeros((-length) % i, dtype=object)])
    counts[:length] = padded.reshape(-1, i).cumsum(axis=0).reshape(-1)[:length]
    degree = new_degree
  tail = np.cumsum(counts[::-1])[::-1]
  return tuple(int(v) for v in tail), math.comb(n + m, n)


def normal_sf(z: float) -> float:
  """P(Z > z) for a standard normal Z."""
  return float(scipy.stats.norm.sf(z))


def mann_whitney_greater(suspect, reference, *, exact_max_work: int = EXACT_MAX_WORK) -> RankTest:
  """One-sided Mann-Whitney U test: do suspect scores tend to exceed reference scores?

  Args:
    suspect: float [n], scores of the suspect set.
    reference: float [m], scores of the reference set (known non-members).
    exact_max_work: use the exact null distribution when there are no ties and
      min(n, m)^2 * max(n, m) is at most this; else the normal approximation.

  Returns:
    A ``RankTest``.
  """
  s = _as_sample(suspect, 'suspect')
  r = _as_sample(reference, 'reference')
  n, m = s.size, r.size
  r_sorted = np.sort(r)
  below = np.searchsorted(r_sorted, s, side='left')
  tied = np.searchsorted(r_sorted, s, side='right') - below
  u = float(below.sum() + 0.5 * tied.sum())
  has_ties = np.unique(np.concatenate([s, r])).size < n + m
  if not has_ties and min(n, m) ** 2 * max(n, m) <= exact_max_work:
    # Not SciPy's exact method: float, and far slower when n and m differ (module docstring).
    tail, total = _exact_upper_tail(n, m)
    p, method = tail[int(u)] / total, 'exact'
  else:
    # U - n m / 2 - 1/2 over the tie-corrected standard deviation; every score tied (variance 0)
    # gives p = 1: no evidence either way.
    p = scipy.stats.mannwhitneyu(s, r, alternative='greater', method='asymptotic').pvalue
    method = 'normal'
  return RankTest(
    u=u,
    p_value=float(min(max(p, 0.0), 1.0)),
    method=method,
    auc=u / (n * m),
    n_suspect=int(n),
    n_reference=int(m),
  )


def binom_cdf(k: int, n: int, p: float) -> float:
  """P(X <= k) for X ~ Binomial(n, p); p outside [0, 1] counts as 0 or 1 (SciPy: nan)."""
  if k < 0:
    return 0.0
  if k >= n or p <= 0.0:
    return 1.0
  if p >= 1.0:
    return 0.0
  return float(scipy.stats.binom.cdf(k, n, p))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
  """The exact (Clopper-Pearson) two-sided binomial confidence interval of k successes in n.

  The lower end solves P(X >= k | p) = (1 - level) / 2 (0 when k = 0); the upper end solves
  P(X <= k | p) = (1 - level) / 2 (1 when k = n): quantiles of beta distributions.

  Args:
    k: successes, 0 <= k <= n.
    n: trials, n >= 1.
    level: the confidence level, in (0, 1).

  Returns:
    ``(lower, upper)``.
  """
  if n < 1 or not 0 <= k <= n:
    raise ValueError(f'need 0 <= k <= n and n >= 1, got k={k}, n={n}')
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must be in (0, 1), got {level}')
  # P(X >= k | p) is the Beta(k, n - k + 1) CDF at p, P(X <= k | p) one minus Beta(k + 1, n - k)'s
  tail = (1.0 - level) / 2
  lower = 0.0 if k == 0 else float(scipy.stats.beta.ppf(tail, k, n - k + 1))
  upper = 1.0 if k == n else float(scipy.stats.beta.ppf(1.0 - tail, k + 1, n - k))
  return lower, upper
