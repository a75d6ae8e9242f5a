"""The target's own samples: does it generate, and does it copy its members?

DRC asks a model to *restore*; a model that cannot generate images like its data cannot show
membership that way. So every audit draws samples from the target (deterministic DDIM from pure
noise, through the same compiled restorer with nothing known) and reports, in pixel space:

* nearest-neighbour precision and recall against real images (Kynkaenniemi et al. 2019, k = 3):
  precision is the fraction of samples inside the k-NN balls of real non-member images (samples
  that look like data), recall the fraction of real images inside the samples' k-NN balls
  (how much of the data the samples cover). Both use as many real images as samples; the same
  figures of real held-out images against other real held-out images (real vs real) are the
  reference a perfect generator would reach.
* near-copies of members, with a stated false-positive rate. Carlini et al.'s rule ("Extracting
  training data from diffusion models", 2023) calls a sample a copy when its nearest member is
  closer than ``alpha`` (0.5) times its mean distance to its ``n`` (50) nearest members; with a
  training set of a few hundred images that rule passes a large share of *real, unseen* images
  too. So the ratio's threshold is calibrated instead: the largest one that at most
  ``COPY_FPR`` (1%) of the calibration part's real non-members pass. Reported side by side: the
  samples' pass rate, the pass rate of the held-out real non-members (the floor: what unseen data
  scores, about 1% by construction, with its interval) and Carlini's fixed rule on both;
* median RMS distance from a sample to its nearest member, beside the same figure for real
  non-members (a generator of members sits closer to them than unseen data does);
* noise textures: the fraction of samples rougher (mean squared difference of neighbouring
  pixels) than 99% of real non-member images; about 1% for a generator of data-like images.
  Pixel-space k-NN balls are wide in few dimensions, so precision alone can pass noise.

A report warns when precision < 0.5 or more than a quarter of the samples are noise textures.
"""

from __future__ import annotations

import hashlib
import io
import json
import types
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from drc_jax.audit import metrics as metrics_lib
from drc_jax.core import fileio, parallel, progress, streams
from drc_jax.drc import conditional as cond_lib
from drc_jax.drc import degrade as degrade_lib
from drc_jax.drc import restore as restore_lib
from drc_jax.drc import scorer as drc_lib

SAMPLES_FILE = 'samples.npz'
K_NN = 3  # k of the precision/recall balls
COPY_ALPHA = 0.5  # Carlini et al.'s alpha
COPY_N = 50  # Carlini et al.'s n nearest
COPY_FPR = 0.01  # the calibrated near-copy rule passes at most this share of real non-members
MIN_PRECISION = 0.5  # below this the report warns that the target hardly generates data
NOISE_QUANTILE = 0.99  # a sample rougher than this quantile of real images is a noise texture
MAX_NOISE_FRACTION = 0.25  # above this the report warns too (a perfect generator gives ~1%)


def make_sampler(model, schedule, steps: int = 50):
  """``sample(params, key_data [B, 2]) -> [B, H, W, C]``: deterministic DDIM (eta = 0) from pure
  noise in ``steps`` steps, nothing known (a pure function; the audit jits it). A latent target
  samples latents and decodes them."""
  cfg = types.SimpleNamespace(restorer='ddim', steps=steps, t_start=schedule.num_timesteps, eta=0.0)
  restore = restore_lib.make_restorer(cfg, model, schedule).restore
  c = model.config

  def sample(params, key_data):
    shape = (key_data.shape[0], c.resolution, c.resolution, c.in_channels)
    zeros = jnp.zeros(shape, jnp.float32)
    nothing_known = degrade_lib.Degradation(zeros, jnp.zeros(shape[:3] + (1,), jnp.float32))
    out = restore(params, key_data, zeros, nothing_known)
    return model.decode(params, out) if getattr(model, 'is_latent', False) else out

  return sample


def make_text_sampler(target, image_shape, steps: int = 50):
  """``sample(params, key_data [B, 2], ids [B, L]) -> [B, H, W, C]`` of a text-conditioned target:
  DDIM (eta = 0) from pure noise under each sample's prompt (its token ids, encoded by the
  target's text tower in the program), unguided (the model's conditional prediction), nothing
  known; an inpainting UNet is given the whole image to fill. ``image_shape`` (H, W, C) is the
  audit's image size."""
  cfg = types.SimpleNamespace(
    restorer='ddim', steps=steps, t_start=target.schedule.num_timesteps, eta=0.0
  )
  restore = cond_lib.make_restorer(cfg, target, 1.0).restore

  def sample(params, key_data, ids):
    b = key_data.shape[0]
    zeros = jnp.zeros((b, *image_shape), jnp.float32)
    nothing_known = degrade_lib.Degradation(zeros, jnp.zeros((b, *image_shape[:2], 1), jnp.float32))
    context = target.encode_text_fn(params, ids)
    return restore(params, key_data, zeros, nothing_known, context, None)

  return sample


def sample_prompts(captions: list[str], num: int) -> list[str]:
  """The prompts of ``num`` samples of a text-conditioned target: ``captions`` (the held-out real
  non-members' captions, in split order) repeated, so sample i has caption i mod len."""
  if not captions:
    raise ValueError('sample_prompts: no captions to sample under')
  return [captions[i % len(captions)] for i in range(num)]


def generate(
  sample_fn, params, num: int, seed: int, *, batch_size: int = 64, inputs: np.ndarray | None = None
) -> np.ndarray:
  """``num`` samples [num, H, W, C] in [-1, 1] from ``sample_fn`` (``make_sampler``, jitted).

  Sample i starts from the noise of key ``fold_in(fold_in(key(seed), streams.SAMPLES), i)``, so a
  sample does not depend on the batch size. ``inputs`` [num, ...] (a text target's prompt ids):
  row i goes to sample i, ``sample_fn(params, keys, inputs_of_the_batch)``.
  """
  out = []
  bar = progress.Progress('sampling the target', num, 'samples')
  for lo in range(0, num, batch_size):
    idx = np.arange(lo, lo + batch_size)
    keys = drc_lib.image_keys(seed, streams.SAMPLES, idx)
    if inputs is None:
      out.append(np.asarray(sample_fn(params, keys)))
    else:  # the last batch is padded with the last row
      out.append(np.asarray(sample_fn(params, keys, inputs[np.minimum(idx, num - 1)])))
    bar.update(min(batch_size, num - lo))
  bar.close()
  return np.concatenate(out)[:num]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """RMS pixel distance [len(a), len(b)] between two image sets."""
  a = a.reshape(len(a), -1).astype(np.float64)
  b = b.reshape(len(b), -1).astype(np.float64)
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


def _kth_neighbour_radius(d_self: np.ndarray, k: int) -> np.ndarray:
  """Distance of each point to its k-th nearest other point of the same set."""
  d = d_self.copy()
  np.fill_diagonal(d, np.inf)
  return np.sort(d, axis=1)[:, k - 1]


def precision_recall(samples: np.ndarray, real: np.ndarray, k: int = K_NN) -> tuple[float, float]:
  """Kynkaenniemi et al.'s k-NN precision and recall of ``samples`` against ``real``."""
  d_sr = _distances(samples, real)  # [S, R]
  r_real = _kth_neighbour_radius(_distances(real, real), k)  # [R]
  r_samp = _kth_neighbour_radius(_distances(samples, samples), k)  # [S]
  precision = float(np.mean(np.any(d_sr <= r_real[None, :], axis=1)))
  recall = float(np.mean(np.any(d_sr <= r_samp[:, None], axis=0)))
  return precision, recall


def copy_ratio(images: np.ndarray, members: np.ndarray, n: int = COPY_N):
  """(ratio [S], nearest member position [S], its RMS distance [S]): each image's distance to its
  nearest member over its mean distance to its ``n`` nearest members (Carlini et al.'s statistic;
  small = a near-copy)."""
  d = _distances(images, members)
  order = np.sort(d, axis=1)
  n = min(n, d.shape[1])
  mean_n = order[:, :n].mean(axis=1)
  ratio = np.where(mean_n > 0, order[:, 0] / np.where(mean_n > 0, mean_n, 1.0), 0.0)
  return ratio, np.argmin(d, axis=1), order[:, 0]


def near_copies(
  samples: np.ndarray, members: np.ndarray, alpha: float = COPY_ALPHA, n: int = COPY_N
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(is_copy bool [S], nearest member position int [S], its RMS distance [S]) under Carlini et
  al.'s rule: ratio < ``alpha``."""
  ratio, nearest, d = copy_ratio(samples, members, n)
  return ratio < alpha, nearest, d


def calibrated_alpha(ratios: np.ndarray, fpr: float = COPY_FPR) -> float:
  """The largest threshold that at most ``fpr`` of ``ratios`` (real non-members) fall below:
  the floor(fpr * N)-th smallest ratio, so exactly floor(fpr * N) pass ``ratio < alpha`` (fewer
  with ties)."""
  r = np.sort(np.asarray(ratios, np.float64))
  return float(r[int(np.floor(fpr * len(r)))])


def _rate(passed: np.ndarray) -> dict[str, Any]:
  k, n = int(np.sum(passed)), int(np.size(passed))
  return {'rate': k / n if n else float('nan'), 'n': n, 'ci95': metrics_lib.wilson_interval(k, n)}


def roughness(images: np.ndarray) -> np.ndarray:
  """Mean squared difference of neighbouring pixels [N]: high for noise textures."""
  x = images.astype(np.float64)
  dh = np.square(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
  dw = np.square(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
  return (dh + dw) / 2


def quality(
  samples: np.ndarray,
  members: np.ndarray,
  nonmembers: np.ndarray,
  calibration_nonmembers: np.ndarray | None = None,
):
  """The sample-quality figures of the module docstring.

  Args:
    samples: the target's samples [S, H, W, C].
    members: its members.
    nonmembers: real, unseen images of the held-out part: the floor of the near-copy rule, the
      real set of precision/recall (the first S) and the real-vs-real reference (the next S).
    calibration_nonmembers: real, unseen images of the calibration part, which set the near-copy
      threshold (None: the first half of ``nonmembers`` does, the floor is the second half).

  Returns:
    (figures dict, nearest member position [S], its RMS distance [S], is_copy bool [S] under the
    calibrated rule).
  """
  if calibration_nonmembers is None:
    half = len(nonmembers) // 2
    calibration_nonmembers, nonmembers = nonmembers[:half], nonmembers[half:]
  s = len(samples)
  real = nonmembers[:s]
  precision, recall = precision_recall(samples, real)
  other = nonmembers[s : 2 * s]  # real vs real: other real held-out images as the 'samples'
  real_pr = precision_recall(other, real[: len(other)]) if len(other) > K_NN else (None, None)
  ratio, nearest, d_nearest = copy_ratio(samples, members)
  cal_ratio, _, _ = copy_ratio(calibration_nonmembers, members)
  floor_ratio, _, d_real = copy_ratio(nonmembers, members)
  alpha = calibrated_alpha(cal_ratio)
  is_copy = ratio < alpha
  rough_limit = float(np.quantile(roughness(nonmembers), NOISE_QUANTILE))
  noise_fraction = float(np.mean(roughness(samples) > rough_limit))
  out = {
    'num_samples': int(s),
    'num_real': int(len(real)),
    'precision': precision,
    'recall': recall,
    'real_vs_real': {'precision': real_pr[0], 'recall': real_pr[1], 'n': int(len(other))},
    'near_copy': {
      'rule': (
        f'nearest member closer than alpha x the mean distance to the {COPY_N} nearest members, '
        f'alpha set so that at most {COPY_FPR:.0%} of the calibration non-members pass'
      ),
      'alpha': alpha,
      'target_fpr': COPY_FPR,
      'n_calibration_nonmembers': int(len(calibration_nonmembers)),
      'samples': _rate(is_copy),
      'heldout_nonmembers': _rate(floor_ratio < alpha),
    },
    'near_copy_carlini': {
      'alpha': COPY_ALPHA,
      'samples': _rate(ratio < COPY_ALPHA),
      'heldout_nonmembers': _rate(floor_ratio < COPY_ALPHA),
    },
    'near_copy_fraction': float(is_copy.mean()),
    'noise_fraction': noise_fraction,
    'median_nn_member_distance_samples': float(np.median(d_nearest)),
    'median_nn_member_distance_nonmembers': float(np.median(d_real)),
    'warnings': [],
  }
  if precision < MIN_PRECISION or noise_fraction > MAX_NOISE_FRACTION:
    out['warnings'].append(
      f'the target hardly generates images like its data ({noise_fraction:.0%} of its samples '
      f'are rougher than 99% of real images, k-NN precision {precision:.2f}): '
      f'restoration-based attacks such as DRC cannot show membership on it'
    )
  return out, nearest, d_nearest, is_copy


def load_or_generate(
  workdir: str,
  target,
  members: np.ndarray,
  nonmembers: np.ndarray,
  calibration_nonmembers: np.ndarray | None = None,
  *,
  sample_fn,
  num: int,
  seed: int,
  steps: int = 50,
  batch_size: int = 64,
  prompts: list[str] | None = None,
) -> dict[str, Any]:
  """Samples and their figures, cached in ``W/samples.npz`` for this target, seed and size.

  ``sample_fn``: ``make_sampler(target.model, target.schedule, steps)``, jitted by the caller (a
  text-conditioned target: ``make_text_sampler``, with ``prompts``, one per sample, tokenized by
  the target); ``nonmembers`` and ``calibration_nonmembers`` as in ``quality``. The result holds
  ``prompts`` too.
  """
  fields = {
    'target': str(target.path),
    'step': int(target.step),
    'num': num,
    'seed': seed,
    'steps': steps,
    'members': len(members),
  }
  inputs = None
  if prompts is not None:
    if len(prompts) != num:
      raise ValueError(f'load_or_generate: {len(prompts)} prompts for {num} samples')
    fields['prompts_sha256'] = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    inputs = np.asarray(target.model.tokenize(list(prompts)), np.int32)
  ident = json.dumps(fields, sort_keys=True)
  path = epath.Path(workdir) / SAMPLES_FILE
  samples = None
  if path.exists():
    with path.open('rb') as f:
      z = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if str(z['ident']) == ident:
      samples = z['samples']
  if samples is None:
    samples = generate(sample_fn, target.params, num, seed, batch_size=batch_size, inputs=inputs)
    buf = io.BytesIO()
    np.savez(buf, samples=samples, ident=np.asarray(ident))
    if parallel.is_writer():  # every process computes the same samples; process 0 writes them
      fileio.atomic_write_bytes(path, buf.getvalue())
  figures, nearest, d_nearest, is_copy = quality(
    samples, members, nonmembers, calibration_nonmembers
  )
  return {
    'figures': figures,
    'samples': samples,
    'nearest': members[nearest],
    'nearest_pos': nearest,
    'nearest_distance': d_nearest,
    'is_copy': is_copy,
    'prompts': None if prompts is None else list(prompts),
  }


def format_line(figures: dict[str, Any]) -> str:
  """One terminal line with the sample figures."""
  line = (
    f'target samples ({figures["num_samples"]}, DDIM 50 steps): k-NN precision '
    f'{figures["precision"]:.2f}, recall {figures["recall"]:.2f}'
  )
  real = figures.get('real_vs_real') or {}
  if real.get('precision') is not None:
    line += f' (real vs real: {real["precision"]:.2f}, {real["recall"]:.2f})'
  copy = figures.get('near_copy')
  if copy:
    line += (
      f'; near-copies of members {copy["samples"]["rate"]:.1%} (real held-out non-members: '
      f'{copy["heldout_nonmembers"]["rate"]:.1%}, the rule set for {copy["target_fpr"]:.0%})'
    )
  else:
    line += f'; near-copies of members {figures["near_copy_fraction"]:.1%}'
  return line + (
    f'; noise textures {figures["noise_fraction"]:.1%}; median RMS distance to the nearest '
    f'member {figures["median_nn_member_distance_samples"]:.3f} (real non-members: '
    f'{figures["median_nn_member_distance_nonmembers"]:.3f})'
  )
