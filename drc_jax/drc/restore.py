"""Restorers: the target model's own reverse diffusion, conditioned on a degradation.

``make_restorer(cfg, model, schedule)`` returns a ``Restorer`` whose
``restore(params, keys [B], images [B,H,W,C], degradation) -> restored [B,H,W,C]`` is a pure
function (the caller jits it once, at the program boundary, with its shardings): the whole reverse
process is one ``lax.scan`` over a step table built on the host (``schedule.py``). Each restorer is
a small factory in ``RESTORERS`` returning a ``Plan`` (its table, its first state and its step);
one scan driver runs every plan. Each image has its own key (``keys`` is a [B] key array); step
``i`` of image ``b`` draws its noise from ``fold_in(keys[b], i)``, so a restoration depends on the
image and its key alone, never on the batch it shares or the number of devices.

* RePaint (Lugmayr et al. 2022): ancestral DDPM steps on the unknown region, the known region
  forward-noised from the original at the step's target time; jumps back by re-noising.
* DDIM inpainting: deterministic DDIM (eta configurable) with the known region replaced at every
  step; ``t_start < T`` starts from the noised degraded image (restoration strength).
* DDNM (Wang et al. 2023): range/null-space projection of the x0 prediction for any linear
  degradation (inpainting, super-resolution, colorization).

Every restorer reports ``nfe`` (model calls per image). ``debug=True`` runs the same step function
from a Python loop, op by op (for inspection); a test shows both give the same result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax.core import schedule as schedule_lib
from drc_jax.core import streams
from drc_jax.drc import degrade as degrade_lib
from drc_jax.models import unet as model_lib


def _bcast_like(v, x):
  return jnp.reshape(v, (1,) * x.ndim)


@dataclasses.dataclass(frozen=True)
class Restorer:
  """A restoration function and its cost."""

  name: str
  nfe: int  # model calls per image
  renoise_steps: int  # forward re-noising steps per image (RePaint)
  restore: Callable  # (params, keys, images, degradation) -> restored; pure, not jitted


class Context(NamedTuple):
  """What every step of one restoration reads: the model's params, the images' keys [B], the
  originals [B, H, W, C] and their degradation."""

  params: Any
  keys: jnp.ndarray
  images: jnp.ndarray
  d: degrade_lib.Degradation


@dataclasses.dataclass(frozen=True)
class Plan:
  """One restorer: a host-built step table, the first state and the step the scan driver runs.

  ``table``: int32 arrays with one row per step; ``init(ctx) -> x``; ``step(ctx, x, i, row) -> x``
  (``i`` the step number, ``row`` the step's entries of ``table``).
  """

  nfe: int
  renoise_steps: int
  table: tuple[np.ndarray, ...]
  init: Callable[[Context], jnp.ndarray]
  step: Callable[[Context, jnp.ndarray, Any, tuple], jnp.ndarray]


# Noise streams folded into each image's key, from the package's one table (streams.py); step i
# uses streams.STEP + i = i.
_INIT_STREAM = streams.INIT  # the starting noise
_FIXED_KNOWN_STREAM = streams.FIXED_KNOWN  # DDIM's one noise for the known region
_KNOWN_STREAM = streams.KNOWN  # RePaint's known-region noise of step i is _KNOWN_STREAM + i
_JUMP_STREAM = streams.JUMP  # RePaint's re-noising (jump) noise before down step i


def _per_image_normal(keys: jnp.ndarray, step, shape) -> jnp.ndarray:
  """[B, *shape] standard normals, image b from fold_in(keys[b], step)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def _eps_and_x0(apply, params, x, t_idx, sched, clip: bool = True):
  """The model's epsilon at schedule index ``t_idx`` and its x0 prediction, clipped to [-1, 1]
  for images (``clip``; latents are not clipped, as LDM samplers do not)."""
  t_model = jnp.broadcast_to(sched.model_timesteps(t_idx), (x.shape[0],))
  eps = apply(params, x, t_model)
  x0 = sched.predict_x0(x, t_idx, eps)
  return eps, jnp.clip(x0, -1.0, 1.0) if clip else x0


# One registry of restorers, read by the code below and by config validation.
# factory(cfg, apply, schedule, clip) -> Plan; ``clip``: clip x0 predictions to [-1, 1] (images).
RESTORERS: dict[str, Callable[..., Plan]] = {}


def register(name: str):
  def add(factory):
    RESTORERS[name] = factory
    return factory

  return add


def _ddim_family(cfg, schedule: schedule_lib.NoiseSchedule, projected: bool):
  """The table and first state shared by DDIM inpainting and DDNM."""
  T = schedule.num_timesteps
  ts = schedule_lib.ddim_times(min(cfg.t_start, T), cfg.steps)
  table = (np.asarray(ts[:-1], np.int32), np.asarray(ts[1:], np.int32))
  from_noise = cfg.t_start >= T

  def init(ctx: Context):
    x_orig, d = ctx.images, ctx.d
    noise = _per_image_normal(ctx.keys, _INIT_STREAM, x_orig.shape[1:])
    if from_noise:
      return noise
    if projected:
      # DDNM's operators need not be masks: start from the noised pseudo-inverse A^+ y.
      return schedule.q_sample(d.pinv(d.measurement, x_orig.shape[-1]), int(ts[0]), noise)
    # Inpainting from t_start < T: the known region noised to t_start with the SAME noise every
    # later step uses for it, and fresh unit noise in the hole (it carries no information, as at
    # t = T; noising the mid-grey fill would hand the model a grey hole as its starting signal).
    fixed = _per_image_normal(ctx.keys, _FIXED_KNOWN_STREAM, x_orig.shape[1:])
    known = schedule.q_sample(x_orig, int(ts[0]), fixed)
    return d.mask * known + (1.0 - d.mask) * noise

  return table, init


@register('ddim')
def ddim(cfg, apply, schedule: schedule_lib.NoiseSchedule, clip: bool = True) -> Plan:
  """DDIM inpainting: DDIM steps (eta configurable), the known region replaced at every step."""
  table, init = _ddim_family(cfg, schedule, projected=False)
  eta = float(cfg.eta)

  def step(ctx: Context, x, i, row):
    t_last, t_cur = row
    x_orig = ctx.images
    _, x0 = _eps_and_x0(apply, ctx.params, x, t_last, schedule, clip)
    eps = schedule.predict_eps(x, t_last, x0)  # consistent with the clipped x0
    noise = _per_image_normal(ctx.keys, i, x_orig.shape[1:])
    unknown = schedule.ddim_step(x, t_last, t_cur, eps, eta, noise, x0=x0)
    # One fixed noise per image for the known region keeps eta = 0 deterministic.
    fixed = _per_image_normal(ctx.keys, _FIXED_KNOWN_STREAM, x_orig.shape[1:])
    known = jnp.where(t_cur >= 0, schedule.q_sample(x_orig, jnp.maximum(t_cur, 0), fixed), x_orig)
    return ctx.d.mask * known + (1.0 - ctx.d.mask) * unknown

  return Plan(cfg.steps, 0, table, init, step)


@register('ddnm')
def ddnm(cfg, apply, schedule: schedule_lib.NoiseSchedule, clip: bool = True) -> Plan:
  """DDNM: the x0 prediction projected onto the measurement (range/null space), any linear A."""
  table, init = _ddim_family(cfg, schedule, projected=True)
  eta = float(cfg.eta)

  def step(ctx: Context, x, i, row):
    t_last, t_cur = row
    d = ctx.d
    _, x0 = _eps_and_x0(apply, ctx.params, x, t_last, schedule, clip)
    c = x.shape[-1]
    x0 = x0 - d.pinv(d.forward(x0), c) + d.pinv(d.measurement, c)  # range-null space
    eps = schedule.predict_eps(x, t_last, x0)
    noise = _per_image_normal(ctx.keys, i, x.shape[1:])
    return jnp.where(t_cur >= 0, schedule.ddim_step(x, t_last, t_cur, eps, eta, noise, x0=x0), x0)

  return Plan(cfg.steps, 0, table, init, step)


@register('repaint')
def repaint(cfg, apply, schedule: schedule_lib.NoiseSchedule, clip: bool = True) -> Plan:
  """RePaint: ancestral steps on the hole, the known region noised to each step's target time."""
  T = schedule.num_timesteps
  sched = schedule.respace(cfg.steps) if cfg.steps < T else schedule
  ts = schedule_lib.repaint_jumps(sched.num_timesteps, cfg.jump_length, cfg.jump_n_sample)
  nfe, renoise = schedule_lib.repaint_counts(ts)
  var = np.asarray(sched.variance('fixedsmall'), np.float32)

  def init(ctx: Context):
    return _per_image_normal(ctx.keys, _INIT_STREAM, ctx.images.shape[1:])

  def step(ctx: Context, x, i, row):
    t_last, t_cur, jump_from = row
    shape = ctx.images.shape[1:]
    noise = _per_image_normal(ctx.keys, i, shape)
    noise_known = _per_image_normal(ctx.keys, _KNOWN_STREAM + i, shape)
    noise_jump = _per_image_normal(ctx.keys, _JUMP_STREAM + i, shape)
    # Resampling: the re-noising steps jump_from -> t_last taken as one exact Gaussian jump,
    # q(x_b | x_a) = N(sqrt(abar_b / abar_a) x_a, (1 - abar_b / abar_a) I) (the same distribution
    # as t_last - jump_from single steps; a no-op when jump_from == t_last). No model call.
    ratio = _bcast_like(sched.abar(t_last) / sched.abar(jump_from), x)
    x = jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * noise_jump
    _, x0 = _eps_and_x0(apply, ctx.params, x, t_last, sched, clip)
    mean = sched.posterior_mean(x0, x, t_last)
    sigma = jnp.sqrt(jnp.asarray(var)[t_last]) * (t_last > 0)
    unknown = mean + sigma * noise
    # Known region at the step's TARGET time t_cur (-1: the original itself).
    known = jnp.where(
      t_cur >= 0, sched.q_sample(ctx.images, jnp.maximum(t_cur, 0), noise_known), ctx.images
    )
    return ctx.d.mask * known + (1.0 - ctx.d.mask) * unknown

  return Plan(nfe, renoise, schedule_lib.repaint_down_steps(ts), init, step)


def run_plan(plan: Plan, debug: bool = False) -> Callable:
  """The scan driver every restorer shares: ``restore(params, keys, images, d) -> restored``.

  keys: [B] typed key array or [B, 2] uint32 key data; images [B, H, W, C] in [-1, 1].
  """
  table = tuple(jnp.asarray(a) for a in plan.table)
  n_steps = len(plan.table[0])

  def restore(params, keys, images, d: degrade_lib.Degradation):
    if keys.dtype == jnp.uint32:
      keys = jax.random.wrap_key_data(keys)
    ctx = Context(params, keys, images, d)
    x = plan.init(ctx)  # the loop state: the current image [B, H, W, C]
    if debug:
      for i in range(n_steps):
        x = plan.step(ctx, x, i, tuple(a[i] for a in table))
      return x

    def body(x, xs):
      i, row = xs
      return plan.step(ctx, x, i, row), None

    x, _ = jax.lax.scan(body, x, (jnp.arange(n_steps), table))
    return x

  return restore


def make_restorer(
  cfg,
  model: model_lib.DiffusionModel,
  schedule: schedule_lib.NoiseSchedule,
  debug: bool = False,
) -> Restorer:
  """The restorer named by ``cfg.restorer`` (a config's ``drc`` section), as a pure function."""
  if cfg.restorer not in RESTORERS:
    raise ValueError(f'config.drc.restorer: unknown {cfg.restorer!r} (known: {sorted(RESTORERS)})')
  clip = not getattr(model, 'is_latent', False)
  plan = RESTORERS[cfg.restorer](cfg, model.apply, schedule, clip)
  return Restorer(cfg.restorer, plan.nfe, plan.renoise_steps, run_plan(plan, debug))
