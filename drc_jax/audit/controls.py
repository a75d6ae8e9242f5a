"""Controls that say when an evaluation fools itself.

The blind baseline (Das et al., "Blind baselines beat membership inference attacks for foundation
models", 2024) never queries the target: a ridge logistic regression on statistics of the images
themselves (intensity mean, spread, foreground fraction, edge energy, an 8-bin histogram and an
8x8 thumbnail), fit on the audit's calibration part (members against non-members) and scored on
the held-out part like every attack. When it separates held-out members from non-members (AUC
above ``SHIFT_AUC`` and its 95% interval above 0.5), members and non-members differ without the
model: the other attacks' figures are then not evidence of membership, and every output says so.
"""

from __future__ import annotations

import numpy as np

from drc_jax.audit import calibration as calibration_lib

BLIND = 'blind'
SHIFT_AUC = 0.6  # held-out AUC above which (interval above 0.5 too) the shift warning fires
L2 = 1.0  # ridge penalty on the standardized feature weights
NEWTON_STEPS = 50
THUMBNAIL = 8  # side of the thumbnail feature (average-pooled)
HISTOGRAM_BINS = 8
SHIFT_WARNING = (
  'members and non-members differ without the model: the blind baseline (image statistics '
  'only, no query to the target) separates them on held-out images (AUC {auc:.3f} [{lo:.3f}, '
  "{hi:.3f}]), so the attacks' figures are not evidence of membership; draw members and "
  'non-members from one distribution'
)


def blind_features(images) -> np.ndarray:
  """float64 [N, F]: the cheap statistics of ``calibration.image_features`` (the first columns,
  the same values), an intensity
  histogram and an average-pooled thumbnail of each image (channels averaged; [-1, 1] inputs)."""
  x = np.asarray(images, np.float64)
  stats = calibration_lib.image_features(x)
  gray = x.mean(axis=-1)  # [N, H, W]
  n, h, w = gray.shape
  hist = np.stack(
    [np.histogram(g, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))[0] / (h * w) for g in gray]
  )
  s = THUMBNAIL
  ys, xs = (np.arange(h) * s) // h, (np.arange(w) * s) // w  # pixel -> thumbnail cell
  thumb = np.zeros((n, s, s))
  np.add.at(thumb, (slice(None), ys[:, None], xs[None, :]), gray)
  counts = np.zeros((s, s))
  np.add.at(counts, (ys[:, None], xs[None, :]), 1.0)
  thumb = (thumb / counts).reshape(n, s * s)
  return np.concatenate([stats, hist, thumb], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean, scale, weights [F + 1]) of a class-balanced ridge logistic regression of ``y`` (0/1)
  on standardized ``x``, by Newton's method (the objective is strictly convex)."""
  mean, scale = x.mean(axis=0), x.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
  w = np.where(y == 1, 0.5 / max((y == 1).sum(), 1), 0.5 / max((y == 0).sum(), 1))
  penalty = np.full(z.shape[1], L2 / len(x))
  penalty[-1] = 0.0  # no penalty on the bias
  beta = np.zeros(z.shape[1])
  for _ in range(NEWTON_STEPS):
    p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
    grad = z.T @ (w * (p - y)) + penalty * beta
    hess = (z * (w * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-12)
    step = np.linalg.solve(hess, grad)
    beta -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return mean, scale, beta


def blind_scores(features: np.ndarray, is_member: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
  """The blind baseline's score of every row (higher = member), fit on ``fit_rows`` only."""
  features = np.asarray(features, np.float64)
  mean, scale, beta = fit_logistic(
    features[fit_rows], np.asarray(is_member)[fit_rows].astype(float)
  )
  return ((features - mean) / scale) @ beta[:-1] + beta[-1]


def shift_warning(blind_metrics) -> str | None:
  """The warning when the blind baseline separates held-out members and non-members, else None."""
  auc = blind_metrics['auc']
  lo, hi = blind_metrics.get('ci95', {}).get('auc', (auc, auc))
  if auc > SHIFT_AUC and lo > 0.5:
    return SHIFT_WARNING.format(auc=auc, lo=lo, hi=hi)
  return None
