"""Text-conditioned latent diffusion (Stable Diffusion, ``targets/sd.py``) for the attacks and DRC:
the conditioned denoiser and the conditional restorations, as pure functions.

The denoiser (``Denoiser``, ``make_denoiser``):

* every prediction is returned as epsilon: a ``v_prediction`` UNet's v becomes
  eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t (diffusers ``DDIMScheduler.step``'s
  ``pred_epsilon`` for ``prediction_type='v_prediction'``; v = sqrt(abar_t) eps - sqrt(1 - abar_t)
  z0 is diffusers' ``get_velocity``), abar_t of the model's own timestep t;
* classifier-free guidance with scale s: s = 1 is the conditional prediction alone (one UNet
  call); otherwise uncond + s (cond - uncond) (two calls, as ``StableDiffusionPipeline``), the
  unconditional context being the empty prompt's, computed once (``empty_context``) and passed in;
* it works on latents z0 = scaling_factor * encode(x) (``latents``), as diffusers' pipelines do;
  ``encode`` is the VAE posterior mean (diffusers' pipelines sample it).

The restorations (pixels in, pixels out; a comparator of ``drc/compare.py`` turns them into
similarities, ``make_conditional_drc``):

* ``make_latent_inpainter``: a 4-channel UNet restores the image's latents with one of
  ``drc/restore.py``'s restorers (RePaint, DDIM inpainting, DDNM) under the caption's context, the
  pixel keep mask carried to the latent grid by ``models/latent.py``'s ``latent_keep_mask`` (a
  latent pixel is known only when every image pixel it covers is), then decoded;
* ``make_unet_inpainter``: a 9-channel inpainting UNet fills the region with its own masked
  conditioning, as diffusers' ``StableDiffusionInpaintPipeline`` (0.42) builds it: the fill mask
  (1 = region to fill) binarised at 0.5, the masked image ``image * (mask < 0.5)``, its latents
  ``scaling_factor * encode(masked image)`` (the pipeline samples the posterior; here its mean),
  the mask resized to the latent grid by ``F.interpolate``'s default nearest mode (pixel
  ``(f i, f j)`` of each block), and the UNet input ``concat[z_t, mask, masked latents]`` along
  channels (``inpaint_unet_input``). Deterministic DDIM steps (eta configurable) from noise (or
  from the noised latents when ``t_start < T``), no known-region blending (the pipeline blends only
  for 4-channel UNets), the last step to abar = 1 (``core/schedule.py``'s convention; diffusers
  with ``set_alpha_to_one=False`` ends at abar_0).

Keys follow ``drc/restore.py``: step i of image b draws from ``fold_in(keys[b], i)``, the start
from ``fold_in(keys[b], streams.INIT)``, so a restoration never depends on its batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax.core import schedule as schedule_lib
from drc_jax.core import streams
from drc_jax.drc import compare as compare_lib
from drc_jax.drc import degrade as degrade_lib
from drc_jax.drc import restore as restore_lib
from drc_jax.models import latent as latent_lib

PREDICTION_TYPES = ('epsilon', 'v_prediction')


def _bcast(v, like):
  """A scalar or [B] coefficient shaped to broadcast against [B, ...]."""
  v = jnp.asarray(v, like.dtype)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def v_to_eps(v: jnp.ndarray, z_t: jnp.ndarray, abar) -> jnp.ndarray:
  """eps = sqrt(abar) v + sqrt(1 - abar) z_t: [B, h, w, c] v and z_t, abar scalar or [B]."""
  a = _bcast(abar, z_t)
  return jnp.sqrt(a) * v + jnp.sqrt(1.0 - a) * z_t


def to_eps(out, z_t, t, schedule: schedule_lib.NoiseSchedule, prediction_type: str):
  """The UNet's output ``out`` at model timestep(s) ``t`` ([B] or scalar int) as epsilon."""
  if prediction_type == 'epsilon':
    return out
  if prediction_type == 'v_prediction':
    return v_to_eps(out, z_t, schedule.abar(t))
  raise ValueError(f'prediction_type: {prediction_type!r} is not one of {PREDICTION_TYPES}')


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A text-conditioned UNet as an epsilon predictor, with classifier-free guidance.

  Attributes:
    apply: ``(params, z [B, h, w, in], t [B], context [B, L, D]) -> [B, h, w, c]`` (epsilon or
      v), e.g. ``SDTarget.apply_fn``.
    schedule: the schedule the UNet was trained with (v is converted with its abar_t).
    prediction_type: 'epsilon' or 'v_prediction'.
    guidance_scale: s; 1 is the conditional prediction alone.
    latent_channels: c; the first c input channels are z_t (an inpainting UNet takes 2c + 1).
  """

  apply: Callable
  schedule: schedule_lib.NoiseSchedule
  prediction_type: str
  guidance_scale: float = 1.0
  latent_channels: int = 4

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(
        f'prediction_type: {self.prediction_type!r} is not one of {PREDICTION_TYPES}'
      )
    if not math.isfinite(self.guidance_scale):
      raise ValueError(f'guidance_scale must be finite, got {self.guidance_scale}')

  @property
  def calls(self) -> int:
    """UNet calls per prediction: 1 without guidance (s = 1), else 2."""
    return 1 if self.guidance_scale == 1.0 else 2

  def output(self, params, z, t, context, null_context=None) -> jnp.ndarray:
    """The guided raw output (epsilon or v): [B, h, w, c].

    Args:
      params: the UNet's params as ``apply`` takes them.
      z: [B, h, w, in] UNet input; t: [B] or scalar model timesteps.
      context: [B, L, D] the captions' contexts.
      null_context: [1 or B, L, D] the empty prompt's context (needed when s != 1).
    """
    b = z.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    cond = self.apply(params, z, t, context)
    if self.calls == 1:
      return cond
    if null_context is None:
      raise ValueError(f'guidance_scale {self.guidance_scale} needs the empty prompt context')
    null = jnp.broadcast_to(null_context, (b,) + null_context.shape[1:])
    uncond = self.apply(params, z, t, null)
    return uncond + self.guidance_scale * (cond - uncond)

  def eps(self, params, z, t, context, null_context=None) -> jnp.ndarray:
    """The guided prediction as epsilon: [B, h, w, c] (see ``output``)."""
    out = self.output(params, z, t, context, null_context)
    t = jnp.broadcast_to(jnp.asarray(t), (z.shape[0],))
    z_t = z[..., : self.latent_channels]
    return to_eps(out, z_t, t, self.schedule, self.prediction_type)


def make_denoiser(target, guidance_scale: float = 1.0) -> Denoiser:
  """The ``Denoiser`` of a loaded ``SDTarget`` over its full params dict.

  An inpainting UNet given latents alone (the attacks) runs in its text-to-image mode: the whole
  image to fill (mask 1 everywhere) and the masked image all zeros (its latents those of a
  uniformly grey image), the fully masked case its training includes. Those grey latents are
  encoded once per latent shape from the target's own weights (as ``empty_context``), not at
  every UNet call of an attack's loop."""
  apply = target.apply_fn
  if target.is_inpainting:
    c, f = int(target.latent_channels), int(target.downsampling_factor)
    grey_by_shape: dict[tuple, np.ndarray] = {}

    def grey_latents(h: int, w: int, dtype) -> np.ndarray:
      key = (h, w, jnp.dtype(dtype).name)
      if key not in grey_by_shape:
        with jax.ensure_compile_time_eval():  # a constant of the program, computed now
          grey = latents(target, target.params, jnp.zeros((1, h * f, w * f, 3), dtype))
          grey_by_shape[key] = np.asarray(grey)
      return grey_by_shape[key]

    def apply(params, z, t, context):
      if z.shape[-1] == c:
        b, h, w, _ = z.shape
        grey = jnp.asarray(grey_latents(h, w, z.dtype))
        mask = jnp.ones((b, h, w, 1), z.dtype)
        z = inpaint_unet_input(z, mask, jnp.broadcast_to(grey, (b, h, w, c)))
      return target.apply_fn(params, z, t, context)

  return Denoiser(
    apply,
    target.schedule,
    target.prediction_type,
    float(guidance_scale),
    int(target.latent_channels),
  )


def empty_context(target, params=None) -> jnp.ndarray:
  """The empty prompt's context [1, L, D] (the unconditional branch and CLiD's null text); compute
  it once per run and pass it in."""
  params = target.params if params is None else params
  ids = jnp.asarray(target.tokenize(['']), jnp.int32)
  return target.encode_text_fn(params, ids)


def latents(target, params, images) -> jnp.ndarray:
  """[B, H, W, 3] images in [-1, 1] -> the UNet's latents [B, h, w, c]: scaling_factor times the
  VAE posterior mean."""
  return target.scaling_factor * target.encode_fn(params, images)


def decode(target, params, z) -> jnp.ndarray:
  """The UNet's latents -> [B, H, W, 3] images: ``vae.decode(z / scaling_factor)``."""
  return target.decode_fn(params, z / target.scaling_factor)


# ----------------------------------------------------------------------------- 9-channel UNets


def nearest_downsample(mask: jnp.ndarray, factor: int) -> jnp.ndarray:
  """[B, H, W, 1] -> [B, H/f, W/f, 1]: torch ``F.interpolate(mask, size=(H/f, W/f))`` (nearest:
  output pixel (i, j) takes input pixel (f i, f j))."""
  b, h, w, c = mask.shape
  if h % factor or w % factor:
    raise ValueError(f'mask {h}x{w} is not a multiple of the downsampling factor {factor}')
  return mask[:, ::factor, ::factor, :]


def inpaint_condition(target, params, images, fill_mask) -> tuple[jnp.ndarray, jnp.ndarray]:
  """An inpainting UNet's conditioning as ``StableDiffusionInpaintPipeline`` builds it.

  Args:
    images: [B, H, W, 3] in [-1, 1].
    fill_mask: [B, H, W, 1] in [0, 1], 1 = region to fill (binarised at 0.5).

  Returns:
    (mask [B, h, w, 1] on the latent grid, masked-image latents [B, h, w, c]).
  """
  fill = (fill_mask >= 0.5).astype(images.dtype)
  masked = images * (fill < 0.5).astype(images.dtype)
  masked_latents = latents(target, params, masked)
  return nearest_downsample(fill, int(target.downsampling_factor)), masked_latents


def inpaint_unet_input(z_t, mask_latent, masked_latents) -> jnp.ndarray:
  """[B, h, w, 2c + 1] = concat[z_t, mask, masked-image latents] (diffusers' channel order)."""
  return jnp.concatenate([z_t, mask_latent.astype(z_t.dtype), masked_latents], axis=-1)


def inpaint_step(
  denoiser: Denoiser,
  params,
  z,
  mask_latent,
  masked_latents,
  t,
  t_prev,
  context,
  null_context=None,
  eta: float = 0.0,
  noise=None,
) -> jnp.ndarray:
  """One DDIM step of a 9-channel inpainting UNet: z_t [B, h, w, c] at model timestep ``t`` ->
  z at ``t_prev`` (-1: the clean latents), guided as ``denoiser``."""
  x = inpaint_unet_input(z, mask_latent, masked_latents)
  eps = denoiser.eps(params, x, t, context, null_context)
  return denoiser.schedule.ddim_step(z, t, t_prev, eps, eta, noise)


def _per_image_normal(keys, stream, shape):
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape))(keys)


def _wrap(keys):
  return jax.random.wrap_key_data(keys) if keys.dtype == jnp.uint32 else keys


def make_unet_inpainter(cfg, target, guidance_scale: float = 1.0) -> restore_lib.Restorer:
  """DDIM inpainting with a 9-channel UNet's own conditioning (see the module docstring).

  ``cfg`` is a config's ``drc`` section (``steps``, ``t_start``, ``eta``). The returned
  ``restore(params, keys [B] or [B, 2], images, d, context [B, L, D], null_context) -> [B, H, W,
  3]`` takes the pixel Degradation ``d`` (its keep mask; the fill mask is ``1 - d.mask``).
  """
  if not target.is_inpainting:
    raise ValueError(
      f'make_unet_inpainter: the UNet takes {target.in_channels} channels, not an inpainting UNet '
      f'(2 x {target.latent_channels} + 1)'
    )
  denoiser = make_denoiser(target, guidance_scale)
  schedule = target.schedule
  T = schedule.num_timesteps
  ts = schedule_lib.ddim_times(min(int(cfg.t_start), T), int(cfg.steps))
  table = (jnp.asarray(ts[:-1], jnp.int32), jnp.asarray(ts[1:], jnp.int32))
  from_noise, eta = int(cfg.t_start) >= T, float(cfg.eta)

  def restore(params, keys, images, d, context, null_context=None):
    keys = _wrap(keys)
    mask_latent, masked_latents = inpaint_condition(target, params, images, 1.0 - d.mask)
    shape = masked_latents.shape[1:]
    z = _per_image_normal(keys, streams.INIT, shape)
    if not from_noise:
      z = schedule.q_sample(latents(target, params, images), int(ts[0]), z)

    def body(z, xs):
      i, t, t_prev = xs
      noise = _per_image_normal(keys, streams.STEP + i, shape) if eta else None
      args = (mask_latent, masked_latents, t, t_prev, context, null_context, eta, noise)
      return inpaint_step(denoiser, params, z, *args), None

    z, _ = jax.lax.scan(body, z, (jnp.arange(len(ts) - 1), *table))
    return decode(target, params, z)

  return restore_lib.Restorer('unet_inpaint', (len(ts) - 1) * denoiser.calls, 0, restore)


def make_latent_inpainter(cfg, target, guidance_scale: float = 1.0) -> restore_lib.Restorer:
  """A 4-channel UNet restoring the latents with ``drc/restore.py``'s ``cfg.restorer`` (RePaint,
  DDIM inpainting, DDNM) under the caption's context; returns a ``Restorer`` whose
  ``restore(params, keys, images, d, context, null_context) -> [B, H, W, 3]`` takes the pixel
  keep mask ``d`` and carries it to the latent grid (``latent_keep_mask``)."""
  if target.is_inpainting:
    raise ValueError('make_latent_inpainter: an inpainting UNet needs make_unet_inpainter')
  if cfg.restorer not in restore_lib.RESTORERS:
    known = sorted(restore_lib.RESTORERS)
    raise ValueError(f'config.drc.restorer: unknown {cfg.restorer!r} (known: {known})')
  denoiser = make_denoiser(target, guidance_scale)

  def apply(p, z, t):  # the restorers' model: params are (params, context, null_context)
    return denoiser.eps(p[0], z, t, p[1], p[2])

  plan = restore_lib.RESTORERS[cfg.restorer](cfg, apply, target.schedule, False)
  run = restore_lib.run_plan(plan)
  factor = int(target.downsampling_factor)

  def restore(params, keys, images, d, context, null_context=None):
    keys = jax.random.key_data(_wrap(keys))
    z0 = latents(target, params, images)
    m = latent_lib.latent_keep_mask(d.mask, factor)
    z = run((params, context, null_context), keys, z0, degrade_lib.Degradation(z0 * m, m))
    return decode(target, params, z)

  return restore_lib.Restorer(cfg.restorer, plan.nfe * denoiser.calls, plan.renoise_steps, restore)


def make_restorer(cfg, target, guidance_scale: float = 1.0) -> restore_lib.Restorer:
  """The inpainting UNet's own conditioning for a 9-channel UNet, else latent inpainting."""
  if target.is_inpainting:
    return make_unet_inpainter(cfg, target, guidance_scale)
  return make_latent_inpainter(cfg, target, guidance_scale)


@dataclasses.dataclass(frozen=True)
class ConditionalDrc:
  """DRC on a text-conditioned target: ``similarities(params, key_data [B, 2], images, aux, side)
  -> [B, K]``, ``aux = {'null_context': [1, L, D]}``, ``side = {'context': [B, L, D]}`` (and
  ``'keep_mask'`` for ``drc.mask='face'``); ``restored(...)`` gives the K restorations [B, K, H,
  W, 3]."""

  nfe: int
  restorer: restore_lib.Restorer
  similarities: Callable
  restored: Callable
  aux: Any = None
  evidence: Callable | None = None  # (..) -> (degraded, restored) [B, K, H, W, 3] as drc/scorer


def make_conditional_drc(cfg, target, null_context=None, guidance_scale=1.0) -> ConditionalDrc:
  """K restorations per image (restoration k keyed ``fold_in(key, k)``, its mask from
  ``fold_in(that, streams.DEGRADE)``, as ``drc/scorer.py``), compared by ``cfg.comparator``."""
  if cfg.mask in degrade_lib.LINEAR:
    raise ValueError(f'config.drc.mask={cfg.mask!r}: a latent target restores inpainting masks')
  if cfg.comparator in compare_lib.ENCODER_COMPARATORS:
    raise ValueError(f'config.drc.comparator={cfg.comparator!r}: needs an encoder (not wired)')
  restorer = make_restorer(cfg, target, guidance_scale)
  degrade, comparator = degrade_lib.make_degrader(cfg), compare_lib.get(cfg.comparator)
  k_total = int(cfg.num_restorations)

  def one(params, key_data, images, k, aux, side):
    keys = jax.vmap(lambda kd: jax.random.fold_in(jax.random.wrap_key_data(kd), k))(key_data)
    mask_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, streams.DEGRADE))(keys)
    d = degrade(mask_keys, images, given_mask=(side or {}).get('keep_mask'))
    null = (aux or {}).get('null_context')
    return d, restorer.restore(params, keys, images, d, side['context'], null)

  def restored(params, key_data, images, aux=None, side=None):
    fn = lambda _, k: (None, one(params, key_data, images, k, aux, side)[1])
    return jnp.moveaxis(jax.lax.scan(fn, None, jnp.arange(k_total))[1], 0, 1)

  def similarities(params, key_data, images, aux=None, side=None):
    def sim(_, k):
      d, y = one(params, key_data, images, k, aux, side)
      return None, comparator(images, y, d)

    return jax.lax.scan(sim, None, jnp.arange(k_total))[1].T  # [K, B] -> [B, K]

  def evidence(params, key_data, images, aux=None, side=None):
    def pair(_, k):
      d, y = one(params, key_data, images, k, aux, side)
      return None, (d.degraded_image(images.shape[-1]), y)

    degraded, rest = jax.lax.scan(pair, None, jnp.arange(k_total))[1]
    return jnp.moveaxis(degraded, 0, 1), jnp.moveaxis(rest, 0, 1)  # [B, K, H, W, C]

  aux = None if null_context is None else {'null_context': null_context}
  return ConditionalDrc(k_total * restorer.nfe, restorer, similarities, restored, aux, evidence)
