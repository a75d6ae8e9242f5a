"""Membership-inference metrics: exact ROC, AUC, ASR, TPR at a fixed FPR, bootstrap intervals.

Pure NumPy, run on the host after scoring. Convention throughout: every attack score is "higher =
member", members are the positive class, and an image is predicted a member iff
``score >= threshold``. Scores must be finite; NaN or infinite scores raise ``ValueError``.

The ROC is exact: one point per distinct score (tied scores move together), starting at (0, 0)
(threshold +inf, nothing predicted member) and ending at (1, 1) (threshold = the lowest score,
everything predicted member). TPR at FPR ``f`` is the highest TPR of a ROC point whose FPR does not
exceed ``f``, with no interpolation. With ``n`` non-members that number rests on about ``n * f``
false positives, and ``attack_metrics`` says so when ``n * f < 10``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Below this many expected false positives a TPR@FPR number gets a warning.
MIN_EXPECTED_FALSE_POSITIVES = 10.0
# Bootstrap work is chunked so that one chunk holds about this many array elements.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def _as_scores(scores: Any, name: str) -> np.ndarray:
  """Returns ``scores`` as a finite, non-empty float64 vector or raises ValueError."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {scores.shape}')
  if scores.size == 0:
    raise ValueError(f'{name} is empty')
  num_nan = int(np.isnan(scores).sum())
  if num_nan:
    raise ValueError(f'{name} has {num_nan} NaN value(s) out of {scores.size}')
  num_inf = int(np.isinf(scores).sum())
  if num_inf:
    raise ValueError(f'{name} has {num_inf} infinite value(s) out of {scores.size}')
  return scores


def _roc_counts(member: np.ndarray, nonmember: np.ndarray):
  """True/false positive counts at +inf and at every distinct score, descending."""
  thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([member, nonmember]))[::-1]])
  tp = member.size - np.searchsorted(np.sort(member), thresholds, side='left')
  fp = nonmember.size - np.searchsorted(np.sort(nonmember), thresholds, side='left')
  return tp, fp, thresholds


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exact ROC curve over all distinct thresholds.

  Args:
    member_scores: float [P], scores of members (the positive class).
    nonmember_scores: float [N], scores of non-members.

  Returns:
    ``(fpr, tpr, thresholds)``, each float64 [D + 1] where D is the number of distinct scores.
    ``thresholds[0] = +inf`` gives the point (0, 0); ``thresholds[i]`` for i >= 1 are the distinct
    scores in descending order, and point i is the rule ``score >= thresholds[i]``; the last point
    is (1, 1).
  """
  member = _as_scores(member_scores, 'member_scores')
  nonmember = _as_scores(nonmember_scores, 'nonmember_scores')
  tp, fp, thresholds = _roc_counts(member, nonmember)
  return fp / nonmember.size, tp / member.size, thresholds


def auc(member_scores, nonmember_scores) -> float:
  """Exact area under the ROC curve.

  Equals the Mann-Whitney U statistic divided by P * N: the probability that a random member
  scores above a random non-member, with ties counted 1/2. This is also the trapezoidal area under
  ``roc_curve``.

  Args:
    member_scores: float [P], scores of members.
    nonmember_scores: float [N], scores of non-members.

  Returns:
    The AUC in [0, 1].
  """
  member = _as_scores(member_scores, 'member_scores')
  nonmember = _as_scores(nonmember_scores, 'nonmember_scores')
  sorted_nonmember = np.sort(nonmember)
  below = np.searchsorted(sorted_nonmember, member, side='left')  # [P]
  below_or_tied = np.searchsorted(sorted_nonmember, member, side='right')  # [P]
  u_statistic = below.sum() + 0.5 * (below_or_tied - below).sum()
  return float(u_statistic / (member.size * nonmember.size))


def asr(member_scores, nonmember_scores) -> float:
  """Attack success rate: the best balanced accuracy (TPR + TNR) / 2 over all thresholds.

  With as many members as non-members (the published protocol) this is the best plain accuracy
  (TP + TN) / (P + N); with unequal sets it does not reward predicting the larger class. The
  thresholds include +inf (everything predicted non-member) and the lowest score (everything
  predicted member), so ASR >= 0.5.

  Args:
    member_scores: float [P], scores of members.
    nonmember_scores: float [N], scores of non-members.

  Returns:
    The best balanced accuracy in [0.5, 1].
  """
  member = _as_scores(member_scores, 'member_scores')
  nonmember = _as_scores(nonmember_scores, 'nonmember_scores')
  tp, fp, _ = _roc_counts(member, nonmember)
  return float(np.max(_balanced_accuracy(tp, fp, member.size, nonmember.size)))


def _balanced_accuracy(tp, fp, p: int, n: int):
  return (np.asarray(tp) / p + (n - np.asarray(fp)) / n) / 2


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
  """The highest TPR of a ROC point whose FPR does not exceed ``max_fpr`` (no interpolation).

  Args:
    fpr: float [D], false-positive rates of the ROC points (as from ``roc_curve``).
    tpr: float [D], true-positive rates of the same points.
    max_fpr: the FPR bound f; a point with ``fpr <= f`` qualifies.

  Returns:
    The TPR; 0.0 if no point qualifies (cannot happen for a ``roc_curve`` output, which starts
    at (0, 0)).
  """
  fpr = np.asarray(fpr, dtype=np.float64)
  tpr = np.asarray(tpr, dtype=np.float64)
  if fpr.shape != tpr.shape:
    raise ValueError(f'fpr and tpr shapes differ: {fpr.shape} vs {tpr.shape}')
  qualifying = tpr[fpr <= max_fpr]
  return float(qualifying.max()) if qualifying.size else 0.0


def paired_difference_ci(
  members: tuple[Any, Any],
  nonmembers: tuple[Any, Any],
  *,
  fprs: Sequence[float] = (0.01, 0.001),
  bootstrap: int = 1000,
  seed: int = 0,
) -> dict[str, list[float]]:
  """95% paired-bootstrap intervals of ``B - A`` for AUC and TPR@FPR, where ``members`` and
  ``nonmembers`` each hold the two scores (A, B) of the same images: every resample draws
  members and non-members with replacement, the same draw for both scores ({} without
  resamples)."""
  if bootstrap <= 0:
    return {}
  ma, mb = (_as_scores(v, 'member_scores') for v in members)
  na, nb = (_as_scores(v, 'nonmember_scores') for v in nonmembers)
  if ma.shape != mb.shape or na.shape != nb.shape:
    raise ValueError('paired scores must be of the same images (same lengths)')
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {'auc': [], **{tpr_metric_name(f): [] for f in fprs}}
  for _ in range(bootstrap):
    i, j = rng.integers(0, ma.size, ma.size), rng.integers(0, na.size, na.size)
    draws['auc'].append(auc(mb[i], nb[j]) - auc(ma[i], na[j]))
    roc_a, roc_b = roc_curve(ma[i], na[j]), roc_curve(mb[i], nb[j])
    for f in fprs:
      draws[tpr_metric_name(f)].append(
        tpr_at_fpr(roc_b[0], roc_b[1], f) - tpr_at_fpr(roc_a[0], roc_a[1], f)
      )
  return {k: np.percentile(v, [2.5, 97.5]).tolist() for k, v in draws.items()}


def _fpr_percent_text(max_fpr: float) -> str:
  """0.01 -> '1', 0.001 -> '0.1'."""
  return f'{max_fpr * 100:g}'


def tpr_metric_name(max_fpr: float) -> str:
  """The ``attack_metrics`` key of TPR at FPR ``max_fpr``.

  Examples: 0.01 -> 'tpr_at_1pct_fpr', 0.001 -> 'tpr_at_0p1pct_fpr'.
  """
  return f'tpr_at_{_fpr_percent_text(max_fpr).replace(".", "p")}pct_fpr'


def _resampled_metrics(
  member_counts: np.ndarray, nonmember_counts: np.ndarray, fprs: Sequence[float]
) -> dict[str, np.ndarray]:
  """AUC, ASR and TPR@FPR of B weighted samples that share one set of distinct score values.

  Args:
    member_counts: int [B, U], how many times each distinct value (ascending) occurs among the
      members of each sample.
    nonmember_counts: int [B, U], the same for non-members.
    fprs: FPR bounds.

  Returns:
    Metric name -> float64 [B].
  """
  num_members = member_counts[0].sum()
  num_nonmembers = nonmember_counts[0].sum()
  nonmembers_below = np.cumsum(nonmember_counts, axis=1) - nonmember_counts  # [B, U]
  u_statistic = (member_counts * (nonmembers_below + 0.5 * nonmember_counts)).sum(axis=1)  # [B]
  zeros = np.zeros((member_counts.shape[0], 1), dtype=member_counts.dtype)
  # Counts predicted member at +inf, then at each distinct value in descending order.
  tp = np.concatenate([zeros, np.cumsum(member_counts[:, ::-1], axis=1)], axis=1)  # [B, U + 1]
  fp = np.concatenate([zeros, np.cumsum(nonmember_counts[:, ::-1], axis=1)], axis=1)  # [B, U + 1]
  out = {
    'auc': u_statistic / (num_members * num_nonmembers),
    'asr': _balanced_accuracy(tp, fp, num_members, num_nonmembers).max(axis=1),
  }
  fpr = fp / num_nonmembers
  for max_fpr in fprs:
    out[tpr_metric_name(max_fpr)] = np.where(fpr <= max_fpr, tp, 0).max(axis=1) / num_members
  return out


def _bootstrap(
  member: np.ndarray, nonmember: np.ndarray, num_resamples: int, seed: int, fprs: Sequence[float]
) -> dict[str, list[float]]:
  """Percentile 95% intervals from resampling members and non-members separately."""
  values = np.unique(np.concatenate([member, nonmember]))  # [U], ascending
  member_codes = np.searchsorted(values, member)  # [P]
  nonmember_codes = np.searchsorted(values, nonmember)  # [N]
  num_values = values.size
  chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // (num_values + member.size + nonmember.size))
  rng = np.random.default_rng(seed)
  samples: dict[str, list[np.ndarray]] = {}
  for start in range(0, num_resamples, chunk):
    size = min(chunk, num_resamples - start)
    row_offset = num_values * np.arange(size)[:, None]  # [b, 1]
    counts = []
    for codes in (member_codes, nonmember_codes):
      picks = codes[rng.integers(0, codes.size, size=(size, codes.size))]  # [b, n]
      flat = np.bincount((picks + row_offset).ravel(), minlength=size * num_values)
      counts.append(flat.reshape(size, num_values))  # [b, U]
    for name, value in _resampled_metrics(counts[0], counts[1], fprs).items():
      samples.setdefault(name, []).append(value)
  return {
    name: [float(q) for q in np.percentile(np.concatenate(chunks), [2.5, 97.5])]
    for name, chunks in samples.items()
  }


def attack_metrics(
  member_scores,
  nonmember_scores,
  *,
  bootstrap: int = 1000,
  seed: int = 0,
  fprs: Sequence[float] = (0.01, 0.001),
) -> dict[str, Any]:
  """All metrics of one attack, with percentile-bootstrap 95% intervals and small-sample warnings.

  Args:
    member_scores: float [P], scores of members (higher = member).
    nonmember_scores: float [N], scores of non-members.
    bootstrap: number of bootstrap resamples; 0 skips the intervals (``ci95`` is then empty).
    seed: seed of the bootstrap resampling.
    fprs: FPR bounds for TPR@FPR; each gives a key from ``tpr_metric_name`` (0.01 ->
      ``tpr_at_1pct_fpr``, 0.001 -> ``tpr_at_0p1pct_fpr``).

  Returns:
    A JSON-serialisable dict with ``auc``, ``asr``, one ``tpr_at_*pct_fpr`` per bound,
    ``n_members``, ``n_nonmembers``, ``ci95`` (metric name -> ``[lo, hi]``; members and non-members
    resampled separately, each to its own size) and ``warnings`` (one string per bound f with
    ``n_nonmembers * f < 10``).

  Raises:
    ValueError: on empty sets or non-finite scores, or a negative ``bootstrap``.
  """
  member = _as_scores(member_scores, 'member_scores')
  nonmember = _as_scores(nonmember_scores, 'nonmember_scores')
  if bootstrap < 0:
    raise ValueError(f'bootstrap must be >= 0, got {bootstrap}')
  fpr, tpr, _ = roc_curve(member, nonmember)
  out: dict[str, Any] = {'auc': auc(member, nonmember), 'asr': asr(member, nonmember)}
  for max_fpr in fprs:
    out[tpr_metric_name(max_fpr)] = tpr_at_fpr(fpr, tpr, max_fpr)
  out['n_members'] = int(member.size)
  out['n_nonmembers'] = int(nonmember.size)
  out['ci95'] = _bootstrap(member, nonmember, bootstrap, seed, fprs) if bootstrap else {}
  out['warnings'] = []
  for max_fpr in fprs:
    expected = nonmember.size * max_fpr
    if expected < MIN_EXPECTED_FALSE_POSITIVES:
      out['warnings'].append(
        f'TPR@{_fpr_percent_text(max_fpr)}%FPR rests on {expected:.3g} expected false positives '
        f'among {nonmember.size} non-members; treat it as a rough indication'
      )
  return out


def _best_threshold(member: np.ndarray, nonmember: np.ndarray) -> float:
  """A threshold maximising balanced accuracy of ``score >= threshold``; see ``calibrate``."""
  tp, fp, thresholds = _roc_counts(member, nonmember)
  # First maximum = highest threshold among equally accurate ones.
  best = int(np.argmax(_balanced_accuracy(tp, fp, member.size, nonmember.size)))
  if best == 0:  # Nothing predicted member: a value just above every score.
    return float(np.nextafter(thresholds[1], np.inf))
  if best == thresholds.size - 1:  # Everything predicted member: the lowest score.
    return float(thresholds[best])
  lowest_member, highest_nonmember = thresholds[best], thresholds[best + 1]
  midpoint = highest_nonmember + (lowest_member - highest_nonmember) / 2
  return float(midpoint if midpoint > highest_nonmember else lowest_member)


def calibration_split(
  num_members: int, num_nonmembers: int, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """The calibration / held-out split of ``calibrate``, from the set sizes alone.

  Each set is split separately: ``round(fraction * n)`` images (at least 1, at most n - 1) go to
  calibration, chosen by one seeded generator (members first, then non-members). Everything fitted
  on "the calibration fraction" (the decision threshold, the per-image calibration model, the
  dataset-inference combiner) uses exactly these images, and everything evaluated uses the rest.

  Args:
    num_members: P >= 2.
    num_nonmembers: N >= 2.
    fraction: the calibration fraction, in (0, 1).
    seed: seed of the random split.

  Returns:
    ``(member_heldout bool [P], nonmember_heldout bool [N])``; False marks calibration images.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}')
  rng = np.random.default_rng(seed)
  heldout_masks = []
  for name, size in (('member_scores', num_members), ('nonmember_scores', num_nonmembers)):
    if size < 2:
      raise ValueError(f'{name} needs at least 2 scores to split, got {size}')
    num_calibration = min(max(int(round(fraction * size)), 1), size - 1)
    heldout = np.ones(size, dtype=bool)
    heldout[rng.permutation(size)[:num_calibration]] = False
    heldout_masks.append(heldout)
  return heldout_masks[0], heldout_masks[1]


_Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int) -> list[float]:
  """95% Wilson score interval of a proportion ``successes / n`` (n >= 1).

  Unlike the normal interval it stays inside [0, 1] and is not empty at 0 or n successes:
  0 of 10 gives [0, 0.278].
  """
  if n < 1 or not 0 <= successes <= n:
    raise ValueError(f'need 0 <= successes <= n and n >= 1, got {successes} of {n}')
  p, z2 = successes / n, _Z95**2
  center = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = _Z95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return [float(max(0.0, center - half)), float(min(1.0, center + half))]


def balanced_accuracy_interval(tp: int, p: int, fp: int, n: int) -> list[float]:
  """95% interval of the balanced accuracy (1 + TPR - FPR) / 2 at a fixed threshold.

  The Agresti-Caffo interval of the difference TPR - FPR of two independent proportions (one
  success and one failure added to each), mapped to the accuracy scale and clipped to [0, 1].
  """
  p1, p2 = (tp + 1) / (p + 2), (fp + 1) / (n + 2)
  se = np.sqrt(p1 * (1 - p1) / (p + 2) + p2 * (1 - p2) / (n + 2))
  d = p1 - p2
  return [float(max(0.0, (1 + d - _Z95 * se) / 2)), float(min(1.0, (1 + d + _Z95 * se) / 2))]


def calibrate(member_scores, nonmember_scores, *, fraction: float, seed: int) -> dict[str, Any]:
  """Fits a threshold on a random calibration part and evaluates it on the held-out rest.

  Each set is split separately: ``round(fraction * n)`` images (at least 1, at most n - 1) go to
  calibration. The threshold maximises the calibration part's balanced
  accuracy (TPR + TNR) / 2 (among equally accurate splits, the one predicting fewest members);
  reported accuracies are balanced too. It lies strictly between the lowest calibration score
  predicted member and the highest predicted non-member (their midpoint), so ``score >= threshold``
  reproduces the fitted split exactly on the calibration part and does not sit on a score.

  Args:
    member_scores: float [P], P >= 2.
    nonmember_scores: float [N], N >= 2.
    fraction: the calibration fraction, in (0, 1).
    seed: seed of the random split.

  Returns:
    A dict with ``threshold``, ``fraction``, ``seed``, ``calibration`` (``n_members``,
    ``n_nonmembers``, ``accuracy``), the held-out ``tpr``, ``fpr``, ``accuracy``, ``n_members`` and
    ``n_nonmembers``, ``ci95`` (95% intervals of the held-out ``tpr`` and ``fpr``, Wilson, and of
    ``accuracy``, Agresti-Caffo), and the held-out masks ``member_heldout`` bool [P] and
    ``nonmember_heldout`` bool [N] (NumPy arrays: drop them before JSON serialisation).
  """
  member = _as_scores(member_scores, 'member_scores')
  nonmember = _as_scores(nonmember_scores, 'nonmember_scores')
  member_heldout, nonmember_heldout = calibration_split(
    member.size, nonmember.size, fraction=fraction, seed=seed
  )
  cal_member, cal_nonmember = member[~member_heldout], nonmember[~nonmember_heldout]
  threshold = _best_threshold(cal_member, cal_nonmember)

  def accuracy(members, nonmembers):  # balanced: (TPR + TNR) / 2, as ASR
    return float(((members >= threshold).mean() + (nonmembers < threshold).mean()) / 2)

  test_member, test_nonmember = member[member_heldout], nonmember[nonmember_heldout]
  tp, fp = int((test_member >= threshold).sum()), int((test_nonmember >= threshold).sum())
  return {
    'threshold': threshold,
    'fraction': float(fraction),
    'seed': int(seed),
    'calibration': {
      'n_members': int(cal_member.size),
      'n_nonmembers': int(cal_nonmember.size),
      'accuracy': accuracy(cal_member, cal_nonmember),
    },
    'tpr': float((test_member >= threshold).mean()),
    'fpr': float((test_nonmember >= threshold).mean()),
    'accuracy': accuracy(test_member, test_nonmember),
    'n_members': int(test_member.size),
    'n_nonmembers': int(test_nonmember.size),
    'ci95': {
      'tpr': wilson_interval(tp, test_member.size),
      'fpr': wilson_interval(fp, test_nonmember.size),
      'accuracy': balanced_accuracy_interval(tp, test_member.size, fp, test_nonmember.size),
    },
    'member_heldout': member_heldout,
    'nonmember_heldout': nonmember_heldout,
  }


def _as_votes(votes: Any, k: int, name: str) -> np.ndarray:
  """Returns ``votes`` as an int64 vector with values in [0, k] or raises ValueError."""
  votes = np.asarray(votes)
  if votes.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {votes.shape}')
  if votes.size == 0:
    raise ValueError(f'{name} is empty')
  if not np.issubdtype(votes.dtype, np.integer) and not (
    np.all(np.isfinite(votes)) and np.all(votes == np.round(votes))
  ):
    raise ValueError(f'{name} must hold integer vote counts')
  votes = votes.astype(np.int64)
  if votes.min() < 0 or votes.max() > k:
    raise ValueError(f'{name} must lie in [0, {k}], got [{votes.min()}, {votes.max()}]')
  return votes


def agree_curve(member_votes, nonmember_votes, k: int) -> dict[str, list]:
  """Precision and recall of "member iff votes >= a" for each agree number a = 1..k.

  Args:
    member_votes: int [P], how many of the k restorations voted "member", per member image.
    nonmember_votes: int [N], the same per non-member image.
    k: the number of restorations (votes per image), >= 1.

  Returns:
    A JSON-serialisable dict of lists, one entry per agree number: ``agree`` (1..k), ``precision``
    (TP / (TP + FP); None where no image is predicted member, as precision is undefined there),
    ``recall`` (TP / P), ``true_positives`` and ``false_positives``; and ``n_members`` (P) and
    ``n_nonmembers`` (N), whose ratio gives the precision of guessing.
  """
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  member = _as_votes(member_votes, k, 'member_votes')
  nonmember = _as_votes(nonmember_votes, k, 'nonmember_votes')
  out: dict[str, list] = {
    'agree': [],
    'precision': [],
    'recall': [],
    'true_positives': [],
    'false_positives': [],
  }
  for agree in range(1, k + 1):
    tp, fp = int((member >= agree).sum()), int((nonmember >= agree).sum())
    out['agree'].append(agree)
    out['precision'].append(tp / (tp + fp) if tp + fp else None)
    out['recall'].append(tp / member.size)
    out['true_positives'].append(tp)
    out['false_positives'].append(fp)
  out['n_members'], out['n_nonmembers'] = int(member.size), int(nonmember.size)
  return out


def percentile_among(scores, reference) -> np.ndarray:
  """Percentile (0..100) of each score among reference scores, mid-rank for ties.

  Args:
    scores: float [M] (or a scalar), scores to place.
    reference: float [R], the reference scores (e.g. all non-members).

  Returns:
    float64 [M]: 100 * (fraction of reference strictly below + half the fraction tied).
  """
  scores = np.atleast_1d(np.asarray(scores, dtype=np.float64))
  scores = _as_scores(scores.ravel(), 'scores')
  sorted_reference = np.sort(_as_scores(reference, 'reference'))
  below = np.searchsorted(sorted_reference, scores, side='left')
  below_or_tied = np.searchsorted(sorted_reference, scores, side='right')
  return 100.0 * (below + 0.5 * (below_or_tied - below)) / sorted_reference.size
