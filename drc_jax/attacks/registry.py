"""Membership attacks behind one interface: ``scores(params, key_data [B,2], images) -> [B]``.

Each attack is a factory in ``ATTACKS`` (the registry config validation reads too) returning a
pure function; the audit jits every attack of a run as one sharded program.

Higher score = member, for every attack (the baselines' errors are negated). Keys are per image
(``drc.image_keys``), so an image's score never depends on its batch. ``nfe`` is the number of
model calls per image.

* ``loss``: -||eps - eps(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t)||^2, one random eps, t = 200.
* ``secmi`` (SecMI-stat, Duan et al. 2023): deterministic DDIM inversion of x0 from t = 0 to
  t_sec - k in steps of k, one step to t_sec and back; -||x_{t_sec-k} - reconstruction||^2.
  As in the public SecMI code this takes (t_sec / k - 1) + 2 = 11 model calls at t_sec = 100.
* ``pia`` (Kong et al. 2024): eps0 = eps(x0, 0), x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps0,
  -sum |eps0 - eps(x_t, t)|^p; ``pian`` first rescales eps0 to eps0 / mean|eps0| * sqrt(2/pi).
* ``sima`` (2025): -sum |eps(x0, t)|^4 on the clean image.
* ``rediffuse`` (ReDiffuse, Li et al. 2025): n times, noise x0 to t with fresh noise and denoise it
  back to 0 with the target's deterministic DDIM sampler (steps of k); -||x0 - mean of the n
  reconstructions||^2. n t / k model calls (20 at the defaults t = 200, k = 100, n = 10).
* ``drc``: mean over K restorations of the comparator's similarity (``drc.make_drc``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax.core import parallel, streams
from drc_jax.drc import scorer as drc_lib


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack: ``scores(params, key_data [B, 2] uint32, images [B,H,W,C], aux, side) -> [B]``
  (drc: [B, K]). ``aux`` is the attack's own extra params (DRC's encoders; None for the others),
  ``side`` per-image inputs made on the host (DRC's face masks), both usually None."""

  name: str
  nfe: int  # model calls per image
  scores: Callable
  aux: Any = None  # host params pytree placed beside the model's (replicated)
  encoder_calls: dict[str, int] = dataclasses.field(default_factory=dict)
  # DRC: ``evidence(params, key_data, images, aux, side) -> (degraded, restored)`` [B, K, ...],
  # from the same scorer as ``scores``; None for the other attacks.
  evidence: Callable | None = None
  # What the attack needs of the target: 'black-box' (restorations or samples only), 'gray-box'
  # (noise predictions) or 'white-box' (weights, gradients).
  access: str = 'gray-box'


def _t(b, t):
  return jnp.full((b,), t, jnp.int32)


def _sum_hw(v):
  return jnp.sum(v, axis=(1, 2, 3))


def _keys_of(key_data):
  return jax.vmap(jax.random.wrap_key_data)(key_data)


# One registry of attacks: name -> factory(config, model, schedule, encoders) -> Attack.
ATTACKS: dict[str, Callable[[Any, Any, Any], Attack]] = {}


def register(name: str):
  def add(factory):
    ATTACKS[name] = factory
    return factory

  return add


@register('drc')
def drc(config, model, schedule, encoders=None) -> Attack:
  scorer = drc_lib.make_drc(config.drc, model, schedule, encoders)
  return Attack(
    'drc',
    scorer.nfe,
    scorer.similarities,
    scorer.aux,
    scorer.encoder_calls,
    scorer.evidence,
    access='black-box',  # the target's inpainting restorations alone
  )


@register('loss')
def loss(config, model, schedule, encoders=None) -> Attack:
  del encoders
  t_loss = config.attacks.loss_t

  def scores(params, key_data, x0, aux=None, side=None):
    del aux, side
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(_keys_of(key_data))
    t = _t(x0.shape[0], t_loss)
    return -_sum_hw(jnp.square(eps - model.apply(params, schedule.q_sample(x0, t, eps), t)))

  return Attack('loss', 1, scores)


@register('secmi')
def secmi(config, model, schedule, encoders=None) -> Attack:
  del encoders
  k, t_sec = config.attacks.secmi_k, config.attacks.secmi_t

  def scores(params, key_data, x0, aux=None, side=None):
    del key_data, aux, side
    b = x0.shape[0]

    def ddim(x, t_from, t_to):
      eps = model.apply(params, x, _t(b, t_from))
      return schedule.ddim_step(x, t_from, t_to, eps)  # eta = 0, also for inversion

    x = x0
    for t_from in range(0, t_sec - k, k):  # 0 -> k -> ... -> t_sec - k
      x = ddim(x, t_from, t_from + k)
    recon = ddim(ddim(x, t_sec - k, t_sec), t_sec, t_sec - k)
    return -_sum_hw(jnp.square(x - recon))

  return Attack('secmi', (t_sec // k - 1) + 2, scores)


def _pia(name: str, normalize: bool):
  def factory(config, model, schedule, encoders=None) -> Attack:
    del encoders
    a = config.attacks

    def scores(params, key_data, x0, aux=None, side=None):
      del key_data, aux, side
      b = x0.shape[0]
      eps0 = model.apply(params, x0, _t(b, 0))
      if normalize:
        eps0 = (
          eps0 / jnp.mean(jnp.abs(eps0), axis=(1, 2, 3), keepdims=True) * math.sqrt(2 / math.pi)
        )
      t = _t(b, a.pia_t)
      diff = eps0 - model.apply(params, schedule.q_sample(x0, t, eps0), t)
      return -_sum_hw(jnp.abs(diff) ** a.pia_p)

    return Attack(name, 2, scores)

  return factory


register('pia')(_pia('pia', normalize=False))
register('pian')(_pia('pian', normalize=True))


@register('sima')
def sima(config, model, schedule, encoders=None) -> Attack:
  del encoders
  del schedule
  t_sima = config.attacks.sima_t

  def scores(params, key_data, x0, aux=None, side=None):
    del key_data, aux, side
    return -_sum_hw(jnp.abs(model.apply(params, x0, _t(x0.shape[0], t_sima))) ** 4)

  return Attack('sima', 1, scores)


@register('rediffuse')
def rediffuse(config, model, schedule, encoders=None) -> Attack:
  """ReDiffuse (Li et al., "Towards black-box membership inference attack for diffusion models",
  ICML 2025, arXiv 2405.20771, Algorithm 1): the target's image-to-image variation API applied n
  times to x0, the n variations averaged and compared with x0; higher = closer = member.

  A variation: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with fresh eps ~ N(0, I) per draw
  (draw i from ``fold_in(image key, i)``), then DDIM with eta = 0 from t down to 0 in steps of k
  (t, t - k, ..., k, one model call each; the last step lands on index 0, abar_0, as in the
  authors' code). Score: -sum (x0 - mean_i recon_i)^2 over pixels and channels.

  Defaults (t = 200, k = 100, n = 10, squared L2 of the averaged reconstruction) are those of the
  authors' public code for their DDPM/DDIM targets (github.com/lijingwei0502/diffusion_mia:
  ``DDIM/attack.py`` main(interval=200, k=100, average=10), ``DDIM/components.py``
  ``ReDiffuseAttacker`` and ``calculate_distance``), not read from the paper's text. That code
  keeps one distance per channel (``flatten(2)``); here they are summed. On a latent target the
  attack runs on the image's latents (``make_attacks``) and compares latents; the paper's Stable
  Diffusion variant decodes and compares images with SSIM instead.

  Black-box: it needs only the variations (noised-and-denoised images), not the noise
  predictions; n t / k model calls per image.
  """
  del encoders
  a = config.attacks
  t_re, k, n = a.rediffuse_t, a.rediffuse_k, a.rediffuse_n
  steps = np.arange(t_re, 0, -k, dtype=np.int32)  # t, t - k, ..., k: the model-calling steps

  def scores(params, key_data, x0, aux=None, side=None):
    del aux, side
    b = x0.shape[0]
    keys = _keys_of(key_data)

    def ddim(x, t):  # one deterministic DDIM step t -> t - k
      eps = model.apply(params, x, _t(b, t))
      return schedule.ddim_step(x, t, t - k, eps), None

    def variation(total, i):
      eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), x0.shape[1:]))(keys)
      recon, _ = jax.lax.scan(ddim, schedule.q_sample(x0, _t(b, t_re), eps), steps)
      return total + recon, None

    total, _ = jax.lax.scan(variation, jnp.zeros_like(x0), jnp.arange(n, dtype=jnp.uint32))
    return -_sum_hw(jnp.square(x0 - total / n))

  return Attack('rediffuse', n * len(steps), scores, access='black-box')


def make_attacks(config, model, schedule, names: list[str], encoders=None) -> dict[str, Attack]:
  """The attacks named in ``names`` (validated config names), as pure functions.

  ``encoders``: DRC's loaded encoders by role (``audit.load_drc_encoders``), if it needs any.
  """
  attacks = {name: ATTACKS[name](config, model, schedule, encoders) for name in names}
  if getattr(model, 'is_latent', False):
    # Latent-diffusion versions of the baselines: they score the image's latents (DRC degrades
    # and compares in pixel space and restores on the latents itself).
    for name, att in attacks.items():
      if name != 'drc':
        attacks[name] = dataclasses.replace(att, scores=_on_latents(model, att.scores))
  return attacks


def _on_latents(model, scores: Callable) -> Callable:
  def on_latents(params, key_data, images, aux=None, side=None):
    return scores(params, key_data, model.encode(params, images), aux, side)

  return on_latents


def make_batch_scorer(attacks: dict[str, Attack]) -> Callable:
  """Every attack on one batch, as one pure function (the caller jits it once, sharded).

  Returns ``score(params, aux {name: params}, key_data {name: [B,2]}, images, side) ->
  {name: [B] or [B, K]}`` (``aux`` as ``aux_params(attacks)``; ``side`` per-image host inputs).
  """

  def score(params, aux, key_data, images, side=None):
    return {
      name: att.scores(params, key_data[name], images, aux.get(name), side)
      for name, att in attacks.items()
    }

  return score


def score_batch(scorer, key_data, images, side, valid) -> dict[str, np.ndarray]:
  """Every attack of ``scorer`` (``audit.Scorer``) on one padded batch, this process's slice of
  it: ``key_data`` {name: [B, 2]}, ``images`` [B, ...], ``side`` {name: [B, ...]}, ``valid`` bool
  [B]. Returns each attack's scores of the valid rows of the global batch, on the host."""
  mesh = scorer.mesh
  out = scorer.score_fn(
    scorer.target.params,
    scorer.aux,
    {n: parallel.shard_batch(mesh, k) for n, k in key_data.items()},
    parallel.shard_batch(mesh, images),
    {k: parallel.shard_batch(mesh, v) for k, v in side.items()},
  )
  keep = parallel.to_host(parallel.shard_batch(mesh, valid))
  return {name: parallel.to_host(v)[keep] for name, v in out.items()}


def aux_params(attacks: dict[str, Attack]) -> dict[str, Any]:
  """The attacks' extra params, ``{name: aux}`` for those that have any."""
  return {name: att.aux for name, att in attacks.items() if att.aux is not None}


def keys_for(names, seed: int, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Per-attack, per-image key data for dataset ``indices``."""
  return {n: drc_lib.image_keys(seed, streams.ATTACKS[n], indices) for n in names}
