"""DRC scoring: K x (degrade -> restore -> compare) per image, as pure functions.

``make_drc(cfg, model, schedule)`` returns a ``DrcScorer`` whose
``similarities(params, keys, images) -> [B, K]`` (pure; the audit jits it once, sharded) runs K
restorations per image (restoration k of image b uses the key ``fold_in(keys[b], k)`` for its
degradation and its noise) and compares each with the original. The membership score is the mean
over K (higher = member). ``evidence`` gives the degraded and restored images of all K
restorations for the report; because keys are per image, evidence recomputed later is exactly what
was scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax.core import streams
from drc_jax.drc import compare as compare_lib
from drc_jax.drc import degrade as degrade_lib
from drc_jax.drc import restore as restore_lib
from drc_jax.drc import saliency as saliency_lib
from drc_jax.models import latent as latent_lib
from drc_jax.targets import encoders as encoders_lib


@dataclasses.dataclass(frozen=True)
class DrcScorer:
  """DRC's pure functions and costs.

  ``aux`` is the encoders' params ``{role: params}`` ('saliency', 'compare'; None without
  encoders), passed to the functions below as their ``aux`` argument so that jitted programs take
  them as arguments (replicated), not as constants. ``side`` holds per-image inputs made on the
  host: ``{'keep_mask': [B, H, W, 1]}`` for ``drc.mask='face'``.
  """

  nfe: int  # model calls per image (all K restorations)
  restorer: restore_lib.Restorer
  similarities: Callable  # (params, key_data [B,2] uint32, images, aux, side) -> [B, K]
  evidence: Callable  # (params, key_data, images, aux, side) -> (degraded, restored) [B,K,H,W,C]
  degradation: Callable  # (key_data, images, k, aux, side) -> the Degradation of restoration k
  aux: Any = None
  encoder_calls: dict[str, int] = dataclasses.field(default_factory=dict)  # per image, by role


def _encoder(encoders, role: str, field: str):
  if role not in encoders:
    raise ValueError(f'config.drc.{field}: this DRC setting needs a {role} encoder directory')
  return encoders[role]


def make_drc(cfg, model, schedule, encoders=None) -> DrcScorer:
  """DRC scorer for a config's ``drc`` section (pure functions; jit them at the boundary).

  ``encoders``: ``{'saliency': Encoder, 'compare': Encoder}`` as the config needs them
  (``drc.saliency='dino'`` with ``drc.mask='saliency_patches'``; ``drc.comparator='cosine'``).
  """
  encoders = encoders or {}
  restorer = restore_lib.make_restorer(cfg, model, schedule)
  degrade = degrade_lib.make_degrader(cfg)
  k_total = int(cfg.num_restorations)
  run = restorer.restore
  calls = {}

  saliency_of = lambda aux, images: None
  if cfg.mask == 'saliency_patches' and cfg.get('saliency', 'foreground') == 'dino':
    dino = saliency_lib.dino_saliency(_encoder(encoders, 'saliency', 'saliency_encoder'))
    saliency_of = lambda aux, images: dino(aux['saliency'], images)
    calls['saliency'] = 1  # once per image: the mask does not depend on the restoration

  if cfg.comparator == 'cosine':
    enc = _encoder(encoders, 'compare', 'compare_encoder')
    prepare = encoders_lib.prepare_fn(enc.preprocess)
    features = lambda aux, x: enc.embed_fn(aux['compare'], prepare(x))
    similarity = lambda aux, fx, x, y, d: compare_lib.cosine(fx, features(aux, y))
    calls['compare'] = 1 + k_total  # the original once, each restoration once
  else:
    comparator = compare_lib.get(cfg.comparator)
    features = lambda aux, x: None
    similarity = lambda aux, fx, x, y, d: comparator(x, y, d)

  def keys_and_degradation(key_data, images, k, saliency, side):
    keys = jax.vmap(lambda kd: jax.random.fold_in(jax.random.wrap_key_data(kd), k))(key_data)
    mask_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, streams.DEGRADE))(keys)
    given = (side or {}).get('keep_mask')
    return keys, degrade(mask_keys, images, saliency=saliency, given_mask=given)

  latent = getattr(model, 'is_latent', False)
  if latent and cfg.mask in degrade_lib.LINEAR:
    raise ValueError(
      f'config.drc.mask={cfg.mask!r}: a latent target restores inpainting masks only (the '
      f'degradation is made in pixel space and its mask carried to the latent grid)'
    )

  def latents_of(params, images):
    return model.encode(params, images) if latent else images

  def one(params, key_data, images, z, k, saliency, side):
    """Restoration k: degraded in pixel space; for a latent target restored on the latents
    ``z`` (the mask carried to the latent grid) and decoded."""
    keys, d = keys_and_degradation(key_data, images, k, saliency, side)
    if not latent:
      return d, run(params, jax.random.key_data(keys), images, d)
    m = latent_lib.latent_keep_mask(d.mask, model.downsampling_factor)
    d_latent = degrade_lib.Degradation(z * m, m)
    restored = model.decode(params, run(params, jax.random.key_data(keys), z, d_latent))
    return d, restored

  def degradation(key_data, images, k, aux=None, side=None):
    return keys_and_degradation(key_data, images, k, saliency_of(aux, images), side)[1]

  batched = cfg.get('restorations', 'scan') == 'batch'

  def over_k(fn):
    """[K, ...] results of ``fn(k)`` for k < K: a scan (K programs of batch B in turn) or, with
    ``drc.restorations='batch'``, one batch of K x B restorations (vmap over k)."""
    if batched:
      return jax.vmap(fn)(jnp.arange(k_total))
    return jax.lax.scan(lambda _, k: (None, fn(k)), None, jnp.arange(k_total))[1]

  def sims(params, key_data, images, aux=None, side=None):
    saliency, fx = saliency_of(aux, images), features(aux, images)
    z = latents_of(params, images)

    def sim_k(k):
      d, restored = one(params, key_data, images, z, k, saliency, side)
      return similarity(aux, fx, images, restored, d)

    return over_k(sim_k).T  # [K, B] -> [B, K]

  def evidence(params, key_data, images, aux=None, side=None):
    saliency = saliency_of(aux, images)
    z = latents_of(params, images)

    def evidence_k(k):
      d, restored = one(params, key_data, images, z, k, saliency, side)
      return d.degraded_image(images.shape[-1]), restored

    degraded, restored = over_k(evidence_k)  # [K, B, H, W, C]
    return jnp.moveaxis(degraded, 0, 1), jnp.moveaxis(restored, 0, 1)  # [B, K, H, W, C]

  aux = {role: encoders[role].params for role in calls} or None
  return DrcScorer(k_total * restorer.nfe, restorer, sims, evidence, degradation, aux, calls)


def image_keys(seed: int, stream: int, indices: np.ndarray) -> np.ndarray:
  """[B, 2] uint32 key data, one key per dataset index: fold_in(fold_in(key(seed), stream), i)."""
  base = jax.random.fold_in(jax.random.key(seed), stream)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
  return np.asarray(jax.random.key_data(keys))


def votes(sims: np.ndarray, threshold: float) -> np.ndarray:
  """Per image, how many of its K restorations are above the member threshold: int [B]."""
  return np.sum(np.asarray(sims) > threshold, axis=1).astype(np.int64)


# How K similarities become one score (``config.drc.aggregation``): 'mean' and 'median' need
# nothing fitted; 'agree' is the paper's agree number: how many of the K restorations vote
# "member", a vote being a similarity above a threshold fitted on calibration non-members only
# (``vote_threshold``).
AGGREGATIONS = ('mean', 'median', 'agree')


def vote_threshold(nonmember_sims: np.ndarray, quantile: float) -> float:
  """The per-restoration vote threshold: the ``quantile`` quantile of the given non-members'
  similarities, every restoration pooled. Pass calibration non-members only."""
  sims = np.asarray(nonmember_sims, np.float64)
  if sims.size == 0:
    raise ValueError('vote_threshold: no non-member similarities to fit the threshold on')
  return float(np.quantile(sims, quantile))


def aggregate(sims: np.ndarray, how: str, threshold: float | None = None) -> np.ndarray:
  """One score per image (higher = member) from its similarities [N, K]: float64 [N].

  'agree' needs the vote threshold (``vote_threshold``); the others ignore it.
  """
  sims = np.asarray(sims, np.float64)
  if sims.ndim != 2:
    raise ValueError(f'aggregate: similarities must be [N, K], got shape {sims.shape}')
  if how == 'mean':
    return sims.mean(axis=1)
  if how == 'median':
    return np.median(sims, axis=1)
  if how == 'agree':
    if threshold is None:
      raise ValueError("aggregate: 'agree' needs the vote threshold (calibration non-members)")
    return votes(sims, threshold).astype(np.float64)
  raise ValueError(f'config.drc.aggregation: {how!r} is not one of {", ".join(AGGREGATIONS)}')


_MASK_WORDS = {
  'center_box': 'the centre box',
  'random_box': 'a random box',
  'random_patches': 'random {p}x{p} patches',
  'saliency_patches': 'the most salient {p}x{p} patches ({saliency} saliency)',
  'face': 'the detected face box',
  'downsample': 'downsampling',
  'grayscale': 'grayscale',
}


def describe(cfg, text=None) -> str:
  """DRC's protocol in words, named for what it is: the variant (the paper's semantic comparison,
  or the pixel variant), restorer and its cost, mask, comparator and aggregation, e.g. "DRC, pixel
  variant: RePaint 50 steps, jumps 10 x 2; random 4x4 patches over 25% removed; masked MSE; mean of
  K = 2". ``text``: a text-conditioned run's ``config.text`` (the restorations are then made
  under each image's caption, with its guidance scale)."""
  variant = 'semantic variant' if cfg.comparator == 'cosine' else 'pixel variant'
  if cfg.restorer == 'repaint':
    jumps = (
      f'jumps {cfg.jump_length} x {cfg.jump_n_sample}'
      if cfg.jump_length > 1 and cfg.jump_n_sample > 1
      else 'no jumps'
    )
    restorer = f'RePaint {cfg.steps} steps, {jumps}'
  else:
    start = '' if cfg.t_start >= 1000 else f' from t = {cfg.t_start}'
    eta = '' if cfg.restorer != 'ddim' or cfg.eta == 0 else f', eta {cfg.eta}'
    restorer = f'{cfg.restorer.upper()} {cfg.steps} steps{start}{eta}'
  words = _MASK_WORDS.get(cfg.mask, cfg.mask).format(
    p=cfg.patch_size, saliency=cfg.get('saliency', 'foreground')
  )
  removed = 'kept, the rest removed' if cfg.invert_mask else 'removed'
  if cfg.mask in ('downsample', 'grayscale'):
    degrade = words
  else:
    degrade = f'{words} over {100 * cfg.mask_ratio:.0f}% {removed}'
  comparator = {
    'masked_mse': 'masked MSE',
    'psnr': 'PSNR',
    'ssim': 'SSIM',
    'ssim_region': 'SSIM of the removed region',
    'cosine': 'cosine of encoder embeddings',
  }.get(cfg.comparator, cfg.comparator)
  how = cfg.get('aggregation', 'mean')
  k = int(cfg.num_restorations)
  agg = {
    'mean': f'mean of K = {k}',
    'median': f'median of K = {k}',
    'agree': f'agree number of K = {k} votes',
  }.get(how, how)
  if text is not None and text.get('captions', ''):
    s = float(text.get('guidance_scale', 1.0))
    restorer += " under each image's caption" + ('' if s == 1.0 else f', guidance {s:g}')
  return f'DRC, {variant}: {restorer}; {degrade}; {comparator}; {agg}'
