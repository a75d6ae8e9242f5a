"""Dataset inference's combiners: one score per image from the attacks' scores, higher = member.

``config.dataset.combiner`` picks one:

* ``'zsum'`` (the default): each attack's score standardized by the mean and standard deviation
  of the reference's fit part (known non-members that never enter the test), then summed with
  equal weights fixed in advance. Every attack's score is higher for members, so the sum is too.
  It uses no member labels: a real auditor has the suspect set and known non-members, not labelled
  members of the target. Its validity needs only that the combiner saw neither a suspect nor a
  test-reference image: under the null hypothesis (the suspects are non-members distributed like
  the reference) suspects and test references are then exchangeable given the combiner, and the
  rank test's p-value is valid. Why not CDI's fit on part of the suspect set: it spends suspects
  (the power at small sets) and needs a second split; the reference's fit part, which would fit
  nothing else, suffices to put the attacks on one scale. Equal weights forgo the gain of weighting
  the strongest attacks up, which only labelled members could measure.
* ``'member_labels'``: an L2-regularized logistic regression of membership on the standardized
  scores, fitted on the calibration fraction of the target's MEMBERS and of the reference. Valid
  for the same reason (it saw no suspect or test-reference image), but its power is an insider's:
  only whoever trained the target has labelled members. Kept for experiments and comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ZSUM = 'zsum'
MEMBER_LABELS = 'member_labels'
KINDS = (ZSUM, MEMBER_LABELS)
COMBINER_L2 = 1e-2  # ridge penalty of the logistic combiner (standardized scores, balanced classes)


@dataclasses.dataclass(frozen=True)
class Combiner:
  """A linear combination of the attacks' scores, higher = member.

  Attributes:
    names: the attacks, in feature order.
    mean, scale: float64 [A], the standardization (of the fitting images).
    weights: float64 [A], the weights on standardized scores.
    bias: the intercept (irrelevant to the rank test; kept for the logistic probability).
    kind: 'zsum' or 'member_labels' (``KINDS``).
  """

  names: tuple[str, ...]
  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray
  bias: float
  kind: str = MEMBER_LABELS

  def score(self, features) -> np.ndarray:
    """The combined score of each row of ``features`` [N, A]: [N]."""
    return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.weights


def fit_zsum(reference_features, names) -> Combiner:
  """The label-free combiner: the sum of the scores standardized by ``reference_features``.

  Args:
    reference_features: float [R, A], R >= 1: the reference's fit part (known non-members that
      never enter the test).
    names: the A attack names.

  Returns:
    A ``Combiner`` of weights 1 and the reference's mean and standard deviation (ddof 1; a score
    constant over the reference, or R = 1, is centred but not scaled).
  """
  ref = np.asarray(reference_features, np.float64)
  if ref.ndim != 2 or not len(ref) or ref.shape[1] != len(names):
    raise ValueError(f'reference features must be [R >= 1, {len(names)}], got {ref.shape}')
  scale = ref.std(axis=0, ddof=1) if len(ref) > 1 else np.zeros(ref.shape[1])
  scale = np.where(scale > 0, scale, 1.0)
  return Combiner(tuple(names), ref.mean(axis=0), scale, np.ones(ref.shape[1]), 0.0, ZSUM)


def _objective(beta, z, y, w, l2):
  f = z @ beta
  loss = np.sum(w * (np.logaddexp(0.0, f) - y * f))  # balanced log loss
  return loss + 0.5 * l2 * np.sum(beta[1:] ** 2)


def fit_logistic(
  member_features, nonmember_features, names, l2: float = COMBINER_L2, max_steps: int = 100
) -> Combiner:
  """The member-label combiner: L2-regularized logistic regression of membership on standardized
  scores (damped Newton).

  Minimizes ``sum_i c_i (log(1 + e^f_i) - y_i f_i) + l2 / 2 |w|^2`` with ``f = b + w . z``, class
  weights ``c_i`` of 1 / (2 P) for members and 1 / (2 N) for non-members (balanced), and ``z`` the
  scores standardized by the fitting images' mean and standard deviation. The intercept is not
  penalized. Strictly convex for ``l2 > 0``, so the Newton steps (halved until the objective
  decreases) reach the unique minimum.

  Args:
    member_features: float [P, A], P >= 1.
    nonmember_features: float [N, A], N >= 1.
    names: the A attack names.
    l2: the ridge penalty, > 0.
    max_steps: Newton steps at most.

  Returns:
    A ``Combiner``.
  """
  mem = np.asarray(member_features, np.float64)
  non = np.asarray(nonmember_features, np.float64)
  if mem.ndim != 2 or non.ndim != 2 or mem.shape[1] != non.shape[1] or not len(mem) or not len(non):
    raise ValueError(f'combiner features must be [P, A] and [N, A], got {mem.shape}, {non.shape}')
  if l2 <= 0:
    raise ValueError(f'l2 must be > 0, got {l2}')
  x = np.concatenate([mem, non])
  y = np.concatenate([np.ones(len(mem)), np.zeros(len(non))])
  w = np.concatenate([np.full(len(mem), 0.5 / len(mem)), np.full(len(non), 0.5 / len(non))])
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  z = np.concatenate([np.ones((len(x), 1)), (x - mean) / scale], axis=1)  # [P + N, 1 + A]
  penalty = np.diag(np.r_[0.0, np.full(x.shape[1], l2)])
  beta = np.zeros(z.shape[1])
  current = _objective(beta, z, y, w, l2)
  for _ in range(max_steps):
    p = 1.0 / (1.0 + np.exp(-(z @ beta)))
    grad = z.T @ (w * (p - y)) + penalty @ beta
    hess = z.T @ (z * (w * p * (1 - p))[:, None]) + penalty
    step = np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
    t = 1.0
    while t > 1e-8:
      new = _objective(beta - t * step, z, y, w, l2)
      if new <= current:
        break
      t /= 2
    beta, current = beta - t * step, new
    if np.max(np.abs(t * step)) < 1e-10:
      break
  return Combiner(tuple(names), mean, scale, beta[1:], float(beta[0]), MEMBER_LABELS)


def fit(kind: str, member_features, reference_features, names) -> Combiner:
  """The combiner ``kind`` (``KINDS``) of the fit parts: ``member_features`` [P, A] (the
  calibration members; only 'member_labels' reads them) and ``reference_features`` [R, A]."""
  if kind == ZSUM:
    return fit_zsum(reference_features, names)
  if kind == MEMBER_LABELS:
    return fit_logistic(member_features, reference_features, names)
  raise ValueError(f'combiner kind {kind!r} not in {KINDS}')


def record(combiner: Combiner, n_members: int, n_reference: int, images: str) -> dict[str, Any]:
  """``dataset.json``'s ``combiner``: its kind, whether it used member labels, its weights and
  what it was fitted on (``n_members`` is 0 for a combiner that reads no member)."""
  labels = combiner.kind == MEMBER_LABELS
  out: dict[str, Any] = {
    'kind': combiner.kind,
    'uses_member_labels': labels,
    'features': list(combiner.names),
    'weights': dict(zip(combiner.names, combiner.weights.tolist())),
    'fit': {'n_members': int(n_members) if labels else 0, 'n_nonmembers': int(n_reference)},
  }
  if labels:
    out['l2'] = COMBINER_L2
    out['fit']['images'] = images
  else:
    out['standardized_by'] = images
  return out


def uses_member_labels(rec: dict[str, Any]) -> bool:
  """Whether a ``dataset.json`` combiner record used member labels; one of an earlier drc_jax
  (``kind`` 'logistic', no ``uses_member_labels``) did."""
  return bool(rec.get('uses_member_labels', rec.get('kind') != ZSUM))


def describe(rec: dict[str, Any]) -> str:
  """The combiner of a ``dataset.json`` in words, for the report and the terminal."""
  fit = rec.get('fit') or {}
  if rec.get('kind') == ZSUM:
    return (
      "sum of the attacks' scores, each standardized by the mean and standard deviation of "
      f'{fit.get("n_nonmembers")} reference images that are not in the test, equal weights; '
      'uses no member labels'
    )
  weights = ', '.join(f'{k} {v:+.3f}' for k, v in (rec.get('weights') or {}).items())
  return (
    f'logistic regression (ridge {rec.get("l2", COMBINER_L2):g}) on standardized scores, '
    f'weights {weights}, fitted on {fit.get("n_members")} labelled members of the target and '
    f"{fit.get('n_nonmembers')} non-members; USES MEMBER LABELS (an insider's power: a real "
    'auditor has none)'
  )
