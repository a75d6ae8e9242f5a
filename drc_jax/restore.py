"""Restorers: the target model's own reverse diffusion, conditioned on a degradation.

``make_restorer(cfg, model, schedule, mesh)`` returns a ``Restorer`` whose
``restore(params, keys [B], images [B,H,W,C], degradation) -> restored [B,H,W,C]`` is ONE
``jax.jit`` program per batch shape: the whole reverse process is a ``lax.scan`` over a step table
built on the host, the batch is sharded on the ('data',) mesh and the params replicated. Each image
has its own key (``keys`` is a [B] key array); step ``i`` of image ``b`` draws its noise from
``fold_in(keys[b], i)``, so a restoration depends on the image and its key alone, never on the
batch it shares or the number of devices.

* RePaint (Lugmayr et al. 2022): ancestral DDPM steps on the unknown region, the known region
  forward-noised from the original at the step's target time; jumps back by re-noising.
* DDIM inpainting: deterministic DDIM (eta configurable) with the known region replaced at every
  step; ``t_start < T`` starts from the noised degraded image (restoration strength).
* DDNM (Wang et al. 2023): range/null-space projection of the x0 prediction for any linear
  degradation (inpainting, super-resolution, colorization).

Every restorer reports ``nfe`` (model calls per image). ``debug=True`` runs the same step function
from a Python loop (for inspection); a test shows both give the same result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax import degrade as degrade_lib
from drc_jax import parallel, streams
from drc_jax import schedule as schedule_lib
from drc_jax.models import unet as model_lib


def repaint_jumps(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
  """RePaint's time sequence: t_T-1 down to -1, jumping back ``jump_length`` steps
  ``jump_n_sample - 1`` times at every multiple of ``jump_length`` below ``t_T - jump_length``."""
  jumps = dict.fromkeys(range(0, t_T - jump_length, jump_length), jump_n_sample - 1)
  t, ts = t_T, []
  while t >= 1:
    t -= 1
    ts.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        ts.append(t)
  ts.append(-1)
  _check_moves(ts, t_T)
  return ts


def _check_moves(ts: list[int], t_T: int) -> None:
  assert ts[0] == t_T - 1 and ts[-1] == -1, (ts[0], ts[-1])
  steps = np.diff(ts)
  assert np.all(np.abs(steps) == 1), 'every move is +-1'
  assert min(ts) == -1 and max(ts) <= t_T - 1, 'in range'


def repaint_counts(ts: list[int]) -> tuple[int, int]:
  """(model calls, re-noising steps) of a RePaint time sequence."""
  steps = np.diff(ts)
  return int(np.sum(steps < 0)), int(np.sum(steps > 0))


def repaint_down_steps(ts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The model-calling (down) moves of a RePaint sequence, each with the jump before it.

  Returns int32 arrays (t_last, t_cur, jump_from), one row per model call: before denoising
  t_last -> t_cur the state is re-noised from jump_from up to t_last (jump_from == t_last: none).
  """
  rows, jump_from = [], ts[0]
  for a, b in zip(ts[:-1], ts[1:]):
    if b > a:  # an up move: accumulate into the pending jump
      continue
    rows.append((a, b, jump_from))
    jump_from = b
  out = np.asarray(rows, np.int32)
  assert len(out) == repaint_counts(ts)[0]
  return out[:, 0], out[:, 1], out[:, 2]


def _bcast_like(v, x):
  return jnp.reshape(v, (1,) * x.ndim)


def ddim_times(t_start: int, steps: int) -> list[int]:
  """``steps`` timesteps evenly spread over [0, t_start - 1], descending, then -1 (clean)."""
  if steps == 1:  # one step from t_start - 1 (linspace would put the only step at t = 0)
    return [t_start - 1, -1]
  ts = np.unique(np.round(np.linspace(0, t_start - 1, steps)).astype(int))[::-1]
  if len(ts) != steps:
    raise ValueError(f'config.drc.steps {steps} > t_start {t_start}')
  return [int(t) for t in ts] + [-1]


@dataclasses.dataclass(frozen=True)
class Restorer:
  """A compiled restoration program and its cost."""

  name: str
  nfe: int  # model calls per image
  renoise_steps: int  # forward re-noising steps per image (RePaint)
  restore: Callable  # (params, keys, images, degradation) -> restored


# Noise streams folded into each image's key, from the package's one table (streams.py); step i
# uses streams.STEP + i = i.
_INIT_STREAM = streams.INIT  # the starting noise
_FIXED_KNOWN_STREAM = streams.FIXED_KNOWN  # DDIM's one noise for the known region
_KNOWN_STREAM = streams.KNOWN  # RePaint's known-region noise of step i is _KNOWN_STREAM + i
_JUMP_STREAM = streams.JUMP  # RePaint's re-noising (jump) noise before down step i


def _per_image_normal(keys: jnp.ndarray, step, shape) -> jnp.ndarray:
  """[B, *shape] standard normals, image b from fold_in(keys[b], step)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def make_restorer(
  cfg,
  model: model_lib.DiffusionModel,
  schedule: schedule_lib.NoiseSchedule,
  mesh=None,
  debug: bool = False,
) -> Restorer:
  """Builds the restorer named by ``cfg.restorer`` (a config's ``drc`` section)."""
  apply = model.apply
  T = schedule.num_timesteps

  def eps_and_x0(params, x, t_idx, sched):
    b = x.shape[0]
    t_model = jnp.broadcast_to(sched.model_timesteps(t_idx), (b,))
    eps = apply(params, x, t_model)
    x0 = jnp.clip(sched.predict_x0(x, t_idx, eps), -1.0, 1.0)
    return eps, x0

  if cfg.restorer == 'repaint':
    sched = schedule.respace(cfg.steps) if cfg.steps < T else schedule
    ts = repaint_jumps(sched.num_timesteps, cfg.jump_length, cfg.jump_n_sample)
    nfe, renoise = repaint_counts(ts)
    var = np.asarray(sched.variance('fixedsmall'), np.float32)
    table = repaint_down_steps(ts)

    def init(params, keys, x_orig, d):
      del params, d
      return _per_image_normal(keys, _INIT_STREAM, x_orig.shape[1:])

    def step(params, keys, x_orig, d, x, i, row):
      t_last, t_cur, jump_from = row
      noise = _per_image_normal(keys, i, x_orig.shape[1:])
      noise_known = _per_image_normal(keys, _KNOWN_STREAM + i, x_orig.shape[1:])
      noise_jump = _per_image_normal(keys, _JUMP_STREAM + i, x_orig.shape[1:])
      # Resampling: the re-noising steps jump_from -> t_last taken as one exact Gaussian jump,
      # q(x_b | x_a) = N(sqrt(abar_b / abar_a) x_a, (1 - abar_b / abar_a) I) (the same distribution
      # as t_last - jump_from single steps; a no-op when jump_from == t_last). No model call.
      ratio = _bcast_like(sched.abar(t_last) / sched.abar(jump_from), x)
      x = jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * noise_jump
      _, x0 = eps_and_x0(params, x, t_last, sched)
      mean = sched.posterior_mean(x0, x, t_last)
      sigma = jnp.sqrt(jnp.asarray(var)[t_last]) * (t_last > 0)
      unknown = mean + sigma * noise
      # Known region at the step's TARGET time t_cur (-1: the original itself).
      known = jnp.where(
        t_cur >= 0, sched.q_sample(x_orig, jnp.maximum(t_cur, 0), noise_known), x_orig
      )
      return d.mask * known + (1.0 - d.mask) * unknown

  elif cfg.restorer in ('ddim', 'ddnm'):
    sched = schedule
    ts = ddim_times(min(cfg.t_start, T), cfg.steps)
    nfe, renoise = cfg.steps, 0
    table = (np.asarray(ts[:-1], np.int32), np.asarray(ts[1:], np.int32))
    eta = float(cfg.eta)
    from_noise = cfg.t_start >= T

    def init(params, keys, x_orig, d):
      del params
      noise = _per_image_normal(keys, _INIT_STREAM, x_orig.shape[1:])
      if from_noise:
        return noise
      if cfg.restorer == 'ddnm':
        # DDNM's operators need not be masks: start from the noised pseudo-inverse A^+ y.
        return sched.q_sample(d.pinv(d.measurement, x_orig.shape[-1]), int(ts[0]), noise)
      # Inpainting from t_start < T: the known region noised to t_start with the SAME noise every
      # later step uses for it, and fresh unit noise in the hole (it carries no information, as at
      # t = T; noising the mid-grey fill would hand the model a grey hole as its starting signal).
      fixed = _per_image_normal(keys, _FIXED_KNOWN_STREAM, x_orig.shape[1:])
      known = sched.q_sample(x_orig, int(ts[0]), fixed)
      return d.mask * known + (1.0 - d.mask) * noise

    if cfg.restorer == 'ddim':

      def step(params, keys, x_orig, d, x, i, row):
        t_last, t_cur = row
        _, x0 = eps_and_x0(params, x, t_last, sched)
        eps = sched.predict_eps(x, t_last, x0)  # consistent with the clipped x0
        noise = _per_image_normal(keys, i, x_orig.shape[1:])
        unknown = sched.ddim_step(x, t_last, t_cur, eps, eta, noise, x0=x0)
        # One fixed noise per image for the known region keeps eta = 0 deterministic.
        fixed = _per_image_normal(keys, _FIXED_KNOWN_STREAM, x_orig.shape[1:])
        known = jnp.where(t_cur >= 0, sched.q_sample(x_orig, jnp.maximum(t_cur, 0), fixed), x_orig)
        return d.mask * known + (1.0 - d.mask) * unknown
    else:

      def step(params, keys, x_orig, d, x, i, row):
        del x_orig
        t_last, t_cur = row
        _, x0 = eps_and_x0(params, x, t_last, sched)
        c = x.shape[-1]
        x0 = x0 - d.pinv(d.forward(x0), c) + d.pinv(d.measurement, c)  # range-null space
        eps = sched.predict_eps(x, t_last, x0)
        noise = _per_image_normal(keys, i, x.shape[1:])
        return jnp.where(t_cur >= 0, sched.ddim_step(x, t_last, t_cur, eps, eta, noise, x0=x0), x0)
  else:
    raise ValueError(f'config.drc.restorer: unknown {cfg.restorer!r}')

  table_arrays = tuple(jnp.asarray(a) for a in table)
  n_steps = len(table[0])

  def restore_impl(params, key_data, images, d):
    keys = jax.random.wrap_key_data(key_data)
    x = init(params, keys, images, d)  # the loop state: the current image [B, H, W, C]

    def body(x, xs):
      i, row = xs
      return step(params, keys, images, d, x, i, row), None

    if debug:
      for i in range(n_steps):
        x = jax.jit(step)(params, keys, images, d, x, i, tuple(a[i] for a in table_arrays))
    else:
      x, _ = jax.lax.scan(body, x, (jnp.arange(n_steps), table_arrays))
    return x

  if debug:
    fn = restore_impl
  elif mesh is not None:
    rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
    fn = jax.jit(restore_impl, in_shardings=(rep, dat, dat, dat), out_shardings=dat)
  else:
    fn = jax.jit(restore_impl)

  def restore(params, keys, images, degradation: degrade_lib.Degradation):
    """keys: [B] typed key array or [B, 2] uint32 key data; images [B, H, W, C] in [-1, 1]."""
    key_data = keys if keys.dtype == jnp.uint32 else jax.random.key_data(keys)
    return fn(params, key_data, images, degradation)

  restore.jitted = fn  # exposed so tests can count traces
  return Restorer(cfg.restorer, nfe, renoise, restore)
