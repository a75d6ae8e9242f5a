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

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax import compare as compare_lib
from drc_jax import degrade as degrade_lib
from drc_jax import restore as restore_lib
from drc_jax import streams


@dataclasses.dataclass(frozen=True)
class DrcScorer:
  nfe: int  # model calls per image (all K restorations)
  restorer: restore_lib.Restorer
  similarities: Callable  # (params, key_data [B,2] uint32, images) -> [B, K]
  evidence: Callable  # (params, key_data, images) -> (degraded, restored) [B, K, H, W, C]
  degradation: Callable  # (key_data, images, k) -> the Degradation of restoration k


def make_drc(cfg, model, schedule) -> DrcScorer:
  """DRC scorer for a config's ``drc`` section (pure functions; jit them at the boundary)."""
  restorer = restore_lib.make_restorer(cfg, model, schedule)
  degrade = degrade_lib.make_degrader(cfg)
  comparator = compare_lib.get(cfg.comparator)
  k_total = int(cfg.num_restorations)
  run = restorer.restore

  def keys_and_degradation(key_data, images, k):
    keys = jax.vmap(lambda kd: jax.random.fold_in(jax.random.wrap_key_data(kd), k))(key_data)
    return keys, degrade(jax.vmap(lambda kk: jax.random.fold_in(kk, streams.DEGRADE))(keys), images)

  def one(params, key_data, images, k):
    keys, d = keys_and_degradation(key_data, images, k)
    restored = run(params, jax.random.key_data(keys), images, d)
    return d, restored

  def degradation(key_data, images, k):
    return keys_and_degradation(key_data, images, k)[1]

  def sims(params, key_data, images):
    def body(_, k):
      d, restored = one(params, key_data, images, k)
      return None, comparator(images, restored, d)

    _, s = jax.lax.scan(body, None, jnp.arange(k_total))  # [K, B]
    return s.T

  def evidence(params, key_data, images):
    def body(_, k):
      d, restored = one(params, key_data, images, k)
      return None, (d.degraded_image(images.shape[-1]), restored)

    _, (degraded, restored) = jax.lax.scan(body, None, jnp.arange(k_total))  # [K, B, H, W, C]
    return jnp.moveaxis(degraded, 0, 1), jnp.moveaxis(restored, 0, 1)  # [B, K, H, W, C]

  return DrcScorer(k_total * restorer.nfe, restorer, sims, evidence, degradation)


def image_keys(seed: int, stream: int, indices: np.ndarray) -> np.ndarray:
  """[B, 2] uint32 key data, one key per dataset index: fold_in(fold_in(key(seed), stream), i)."""
  base = jax.random.fold_in(jax.random.key(seed), stream)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
  return np.asarray(jax.random.key_data(keys))


def votes(sims: np.ndarray, threshold: float) -> np.ndarray:
  """Per image, how many of its K restorations are above the member threshold: int [B]."""
  return np.sum(np.asarray(sims) > threshold, axis=1).astype(np.int64)
