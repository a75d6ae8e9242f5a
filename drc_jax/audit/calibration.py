"""Per-image calibration: subtract each image's predicted non-member score quantile.

A raw membership score mixes membership with how hard an image is (a uniform shirt is restored
well by any model; a sandal is not). Following the quantile-regression attacks (Bertran et al.,
NeurIPS 2023; Tang et al., ICML 2024, on diffusion models), ``audit.calibration='quantile'`` fits,
for every attack, a linear quantile regression that predicts the ``1 - audit.calibration_fpr``
quantile of a *non-member's* score from cheap statistics of the image itself, and reports the
calibrated score

    calibrated(x) = score(x) - predicted_quantile(x)

beside the raw one. "Member iff calibrated > 0" then has a false-positive rate near the target for
every kind of image, and the ROC of the calibrated score is no longer driven by image difficulty.

What fits and what is evaluated (``metrics.calibration_split``, the audit's calibration split):

* the model is fitted on the calibration fraction of the non-members only (no member is seen);
* every number reported (raw and calibrated AUC, TPR@1%/0.1%FPR, the rates at 0) is computed on
  the held-out members and held-out non-members only, raw and calibrated on the same images.

The model: standardized features, ``q(x) = w . z(x) + b``, minimizing the mean pinball loss plus
``audit.calibration_l2 * |w|^2`` with full-batch Adam (cosine-decayed step) in one ``lax.scan``
over steps (one compiled loop), ``vmap`` over attacks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from drc_jax.audit import metrics as metrics_lib
from drc_jax.data import sources as data_lib

METHODS = ('none', 'quantile')
FEATURES = ('mean', 'std', 'foreground', 'gradient_energy')
# A pixel is foreground when it differs from the image's background (the median of its border
# pixels) by more than this, on the [-1, 1] scale (0.1 of the intensity range).
FOREGROUND_THRESHOLD = 0.2
FIT_STEPS = 2000  # full-batch Adam steps
FIT_LR = 0.05  # initial Adam step on standardized targets (cosine-decayed to 0)
_FEATURE_BATCH = 1024  # images read at once when computing features


def image_features(images) -> np.ndarray:
  """Cheap statistics of each image: float64 [N, 4] in the order of ``FEATURES``.

  Args:
    images: float [N, H, W, C] in [-1, 1] (the model's input); channels are averaged first.

  Returns:
    Per image: the mean intensity, its standard deviation, the fraction of foreground pixels
    (``FOREGROUND_THRESHOLD`` away from the median of the border pixels) and the gradient energy
    (sum of squared horizontal and vertical neighbour differences, divided by H * W).
  """
  x = np.asarray(images, np.float64)
  if x.ndim != 4:
    raise ValueError(f'images must be [N, H, W, C], got shape {x.shape}')
  x = x.mean(axis=-1)  # [N, H, W]
  n, h, w = x.shape
  border = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
  background = np.median(border, axis=1)  # [N]
  foreground = (np.abs(x - background[:, None, None]) > FOREGROUND_THRESHOLD).mean(axis=(1, 2))
  gradient = (
    np.square(np.diff(x, axis=2)).sum(axis=(1, 2)) + np.square(np.diff(x, axis=1)).sum(axis=(1, 2))
  ) / (h * w)
  return np.stack([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), foreground, gradient], axis=1)


def table_features(
  source: data_lib.ImageSource, indices, data_cfg, features=image_features
) -> np.ndarray:
  """``features`` (default ``image_features``: [N, 4]) of the images at dataset ``indices``, read
  in chunks."""
  indices = np.asarray(indices, np.int64)
  out = []
  for lo in range(0, len(indices), _FEATURE_BATCH):
    images, _, _ = data_lib.load_images(source, indices[lo : lo + _FEATURE_BATCH], data_cfg)
    out.append(features(images))
  return np.concatenate(out) if out else np.zeros((0, len(FEATURES)))


def pinball_loss(residual, tau):
  """The quantile (pinball) loss of ``residual = y - q``: tau * r if r >= 0 else (tau - 1) * r."""
  return jnp.maximum(tau * residual, (tau - 1.0) * residual)


def _fit_standardized(z, y, tau, l2, lr, steps: int):
  """Linear quantile regressions sharing the features ``z`` [N, F], one per row of ``y`` [A, N].

  Returns (weights [A, F], bias [A]).
  """
  schedule = optax.cosine_decay_schedule(lr, steps)
  opt = optax.adam(schedule)

  def fit_one(y1):  # [N]
    init = {'w': jnp.zeros(z.shape[1], z.dtype), 'b': jnp.quantile(y1, tau)}

    def objective(p):
      return jnp.mean(pinball_loss(y1 - (z @ p['w'] + p['b']), tau)) + l2 * jnp.sum(p['w'] ** 2)

    def step(carry, _):
      p, state = carry
      updates, state = opt.update(jax.grad(objective)(p), state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (init, opt.init(init)), None, length=steps)
    return p['w'], p['b']

  return jax.vmap(fit_one)(y)


class QuantileModel:
  """Fitted linear quantile regressions (one per target row), in NumPy on the host.

  Attributes:
    tau: the fitted quantile level.
    feature_mean, feature_scale: float64 [F], the standardization of the features.
    target_loc, target_scale: float64 [A], the standardization of each target.
    weights: float64 [A, F], on standardized features and targets.
    bias: float64 [A].
  """

  def __init__(self, tau, feature_mean, feature_scale, target_loc, target_scale, weights, bias):
    self.tau = float(tau)
    self.feature_mean, self.feature_scale = feature_mean, feature_scale
    self.target_loc, self.target_scale = target_loc, target_scale
    self.weights, self.bias = weights, bias

  def predict(self, features) -> np.ndarray:
    """The predicted quantile of every target for each row of ``features`` [N, F]: [A, N]."""
    z = (np.asarray(features, np.float64) - self.feature_mean) / self.feature_scale
    standardized = self.weights @ z.T + self.bias[:, None]  # [A, N]
    return standardized * self.target_scale[:, None] + self.target_loc[:, None]


def _scale(x: np.ndarray, axis: int) -> np.ndarray:
  s = x.std(axis=axis)
  return np.where(s > 0, s, 1.0)


def fit_quantile_regression(
  features, targets, *, tau: float, l2: float = 0.0, steps: int = FIT_STEPS, lr: float = FIT_LR
) -> QuantileModel:
  """Fits ``q_a(x) = w_a . z(x) + b_a`` to the ``tau`` quantile of each ``targets[a]``.

  Features are standardized by their mean and standard deviation, each target by its median and
  standard deviation (the fit runs in float32 on those scales); ``l2`` penalizes ``|w|^2`` on that
  scale, not the intercept.

  Args:
    features: float [N, F].
    targets: float [A, N] (or [N] for one target).
    tau: the quantile level, in (0, 1).
    l2: ridge penalty on the standardized weights, >= 0.
    steps: Adam steps.
    lr: initial Adam step.

  Returns:
    A ``QuantileModel``.
  """
  x = np.asarray(features, np.float64)
  y = np.atleast_2d(np.asarray(targets, np.float64))
  if x.ndim != 2 or y.shape[1] != x.shape[0] or x.shape[0] < 1:
    raise ValueError(f'features [N, F] and targets [A, N] disagree: {x.shape} vs {y.shape}')
  if not 0.0 < tau < 1.0:
    raise ValueError(f'tau must be in (0, 1), got {tau}')
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError('features and targets must be finite')
  f_mean, f_scale = x.mean(axis=0), _scale(x, axis=0)
  y_loc, y_scale = np.median(y, axis=1), _scale(y, axis=1)
  z = ((x - f_mean) / f_scale).astype(np.float32)
  ys = ((y - y_loc[:, None]) / y_scale[:, None]).astype(np.float32)
  w, b = _fit_standardized(
    jnp.asarray(z),
    jnp.asarray(ys),
    jnp.float32(tau),
    jnp.float32(l2),
    jnp.float32(lr),
    steps=int(steps),
  )
  return QuantileModel(
    tau, f_mean, f_scale, y_loc, y_scale, np.asarray(w, np.float64), np.asarray(b, np.float64)
  )


_REPORTED = ('auc', 'tpr_at_1pct_fpr', 'tpr_at_0p1pct_fpr')


def per_image_calibration(
  config, table: dict[str, np.ndarray], features: np.ndarray
) -> dict[str, dict[str, Any]]:
  """Raw and calibrated held-out metrics of every attack in ``table`` (JSON-ready).

  Args:
    config: the run config (``audit.calibration_fraction``, ``calibration_fpr``,
      ``calibration_l2``, ``bootstrap`` and ``seed`` are read).
    table: the audit's score table (members first, then non-members, as ``store.load_scores``).
    features: float [N, F], ``image_features`` of the table's rows.

  Returns:
    attack -> {``method``, ``fpr``, ``quantile``, ``features``, ``fit`` (what fitted the model),
    ``raw`` and ``calibrated`` (``auc``, TPR@1%/0.1%FPR and their 95% bootstrap intervals on the
    held-out images), ``difference`` (calibrated - raw), ``at_zero`` (held-out TPR and FPR of
    "member iff calibrated > 0"), ``weights`` (per standardized feature) and ``warnings``}.
  """
  a = config.audit
  members = np.asarray(table['split']) == 1
  features = np.asarray(features, np.float64)
  if features.shape[0] != members.size:
    raise ValueError(f'{features.shape[0]} feature rows for {members.size} scored images')
  member_heldout, nonmember_heldout = metrics_lib.calibration_split(
    int(members.sum()), int((~members).sum()), fraction=a.calibration_fraction, seed=config.seed
  )
  fit_rows = np.flatnonzero(~members)[~nonmember_heldout]  # calibration non-members only
  test_members = np.flatnonzero(members)[member_heldout]
  test_nonmembers = np.flatnonzero(~members)[nonmember_heldout]
  names = sorted(k[len('score/') :] for k in table if k.startswith('score/'))
  scores = np.stack([np.asarray(table['score/' + n], np.float64) for n in names])  # [A, N]
  tau = 1.0 - a.calibration_fpr
  model = fit_quantile_regression(
    features[fit_rows], scores[:, fit_rows], tau=tau, l2=a.calibration_l2
  )
  calibrated = scores - model.predict(features)  # [A, N]
  expected_above = fit_rows.size * a.calibration_fpr
  warnings = []
  if expected_above < metrics_lib.MIN_EXPECTED_FALSE_POSITIVES:
    warnings.append(
      f'the {tau:g} quantile is fitted on {fit_rows.size} non-members, about '
      f'{expected_above:.3g} of them above it: a rough estimate'
    )
  out = {}
  for i, name in enumerate(names):
    entry: dict[str, Any] = {
      'method': 'quantile',
      'fpr': float(a.calibration_fpr),
      'quantile': tau,
      'features': list(FEATURES),
      'l2': float(a.calibration_l2),
      'fit': {
        'n_nonmembers': int(fit_rows.size),
        'n_members': 0,
        'images': 'the calibration fraction of the non-members',
      },
      'weights': dict(zip(FEATURES, model.weights[i].tolist())),
      'warnings': list(warnings),
    }
    for kind, values in (('raw', scores[i]), ('calibrated', calibrated[i])):
      m = metrics_lib.attack_metrics(
        values[test_members], values[test_nonmembers], bootstrap=a.bootstrap, seed=config.seed
      )
      entry[kind] = {k: m[k] for k in _REPORTED}
      entry[kind]['ci95'] = {k: v for k, v in m['ci95'].items() if k in _REPORTED}
      entry['n_members'], entry['n_nonmembers'] = m['n_members'], m['n_nonmembers']
    entry['difference'] = {k: entry['calibrated'][k] - entry['raw'][k] for k in _REPORTED}
    # Paired: the same resampled held-out images for the raw and the calibrated score.
    entry['difference_ci95'] = metrics_lib.paired_difference_ci(
      (scores[i][test_members], calibrated[i][test_members]),
      (scores[i][test_nonmembers], calibrated[i][test_nonmembers]),
      bootstrap=a.bootstrap,
      seed=config.seed,
    )
    entry['at_zero'] = {
      'tpr': float(np.mean(calibrated[i, test_members] > 0)),
      'fpr': float(np.mean(calibrated[i, test_nonmembers] > 0)),
    }
    out[name] = entry
  return out
