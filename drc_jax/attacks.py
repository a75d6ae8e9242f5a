"""Membership attacks behind one interface: ``scores(params, key_data [B,2], images) -> [B]``.

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
* ``drc``: mean over K restorations of the comparator's similarity (``drc.make_drc``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax import drc as drc_lib
from drc_jax import parallel, streams


@dataclasses.dataclass(frozen=True)
class Attack:
  name: str
  nfe: int  # model calls per image
  scores: Callable  # (params, key_data [B, 2] uint32, images [B,H,W,C]) -> [B] (drc: [B, K])


def _t(b, t):
  return jnp.full((b,), t, jnp.int32)


def make_attacks(config, model, schedule, names: list[str]) -> dict[str, Attack]:
  """The attacks named in ``names`` (validated config names), unjitted."""
  a = config.attacks
  apply = model.apply
  sum_hw = lambda v: jnp.sum(v, axis=(1, 2, 3))
  out: dict[str, Attack] = {}

  def keys_of(key_data):
    return jax.vmap(jax.random.wrap_key_data)(key_data)

  def loss(params, key_data, x0):
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(keys_of(key_data))
    t = _t(x0.shape[0], a.loss_t)
    return -sum_hw(jnp.square(eps - apply(params, schedule.q_sample(x0, t, eps), t)))

  def secmi(params, key_data, x0):
    del key_data
    b, k, t_sec = x0.shape[0], a.secmi_k, a.secmi_t

    def ddim(x, t_from, t_to):
      eps = apply(params, x, _t(b, t_from))
      return schedule.ddim_step(x, t_from, t_to, eps)  # eta = 0, also for inversion

    x = x0
    for t_from in range(0, t_sec - k, k):  # 0 -> k -> ... -> t_sec - k
      x = ddim(x, t_from, t_from + k)
    recon = ddim(ddim(x, t_sec - k, t_sec), t_sec, t_sec - k)
    return -sum_hw(jnp.square(x - recon))

  def pia_scores(params, x0, normalize):
    b = x0.shape[0]
    eps0 = apply(params, x0, _t(b, 0))
    if normalize:
      eps0 = eps0 / jnp.mean(jnp.abs(eps0), axis=(1, 2, 3), keepdims=True) * math.sqrt(2 / math.pi)
    t = _t(b, a.pia_t)
    return -sum_hw(jnp.abs(eps0 - apply(params, schedule.q_sample(x0, t, eps0), t)) ** a.pia_p)

  def sima(params, key_data, x0):
    del key_data
    return -sum_hw(jnp.abs(apply(params, x0, _t(x0.shape[0], a.sima_t))) ** 4)

  fns = {
    'loss': (loss, 1),
    'secmi': (secmi, (a.secmi_t // a.secmi_k - 1) + 2),
    'pia': (lambda p, k, x: pia_scores(p, x, False), 2),
    'pian': (lambda p, k, x: pia_scores(p, x, True), 2),
    'sima': (sima, 1),
  }
  for name in names:
    if name == 'drc':
      scorer = drc_lib.make_drc(config.drc, model, schedule)
      out[name] = Attack('drc', scorer.nfe, scorer.similarities)
    else:
      fn, nfe = fns[name]
      out[name] = Attack(name, nfe, fn)
  return out


def make_batch_scorer(attacks: dict[str, Attack], mesh=None) -> Callable:
  """One jitted, sharded program scoring a batch with every attack.

  Returns ``score(params, key_data {name: [B,2]}, images) -> {name: [B] or [B, K]}``.
  """

  def score(params, key_data, images):
    return {name: att.scores(params, key_data[name], images) for name, att in attacks.items()}

  if mesh is None:
    return jax.jit(score)
  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(score, in_shardings=(rep, dat, dat), out_shardings=dat)


def keys_for(names, seed: int, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Per-attack, per-image key data for dataset ``indices``."""
  return {n: drc_lib.image_keys(seed, streams.ATTACKS[n], indices) for n in names}
