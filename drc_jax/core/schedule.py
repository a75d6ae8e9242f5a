"""Diffusion noise schedules: built on the host in NumPy, used inside jit as constants.

Index convention (as in the DDPM code): timestep ``t`` runs over ``0 .. T-1``; ``betas[t]`` is the
noise added by the step that produces ``x_t`` from ``x_{t-1}`` (``x_{-1}`` is the clean image), so

  alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])
  q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I)

and ``alphas_cumprod_prev[0] = 1`` (the state before step 0 is the clean image). A respaced
schedule keeps a ``timestep_map`` from its own indices to the model's original timesteps: the model
is always called with the original timestep.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def linear_betas(
  num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
  """Linear betas as in DDPM (Ho et al. 2020), float64 [T]."""
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Betas linear in sqrt(beta), float64 [T]: latent diffusion's schedule (CompVis LDM
  ``make_beta_schedule('linear')``, diffusers ``beta_schedule='scaled_linear'``)."""
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  if not (beta_start > 0 and beta_end > 0):
    raise ValueError(f'beta_start and beta_end must be positive, got {beta_start}, {beta_end}')
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule of Nichol & Dhariwal (2021), float64 [T]; diffusers calls it
  ``squaredcos_cap_v2`` (``betas_for_alpha_bar``, the same formula and cap)."""
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = [
    min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
    for i in range(num_timesteps)
  ]
  return np.asarray(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, spec: int | str) -> list[int]:
  """Chooses which original timesteps a respaced schedule keeps.

  Args:
    num_timesteps: T of the original schedule.
    spec: an int N (N steps evenly spread over [0, T-1], both ends kept, as guided-diffusion's
      ``space_timesteps`` with one section), or ``'ddimN'`` (the stride ``T // N`` from 0, as DDIM).

  Returns:
    Sorted list of kept original timesteps.
  """
  if isinstance(spec, str) and spec.startswith('ddim'):
    n = int(spec[4:])
    stride = num_timesteps // n if n > 0 else 0
    if n < 1 or stride < 1 or len(range(0, num_timesteps, stride)) != n:
      raise ValueError(f'cannot take {n} evenly strided steps from {num_timesteps}')
    return list(range(0, num_timesteps, stride))
  n = int(spec)
  if not 1 <= n <= num_timesteps:
    raise ValueError(f'cannot respace {num_timesteps} steps to {n}')
  if n == 1:
    return [0]
  frac_stride = (num_timesteps - 1) / (n - 1)
  steps = [int(round(i * frac_stride)) for i in range(n)]
  assert len(set(steps)) == n, steps
  return steps


_BETAS = {'linear': linear_betas, 'scaled_linear': scaled_linear_betas, 'cosine': cosine_betas}
BETA_SCHEDULES = tuple(_BETAS)
RANGED_SCHEDULES = ('linear', 'scaled_linear')  # those that take beta_start and beta_end


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """Host-side (NumPy float64) schedule; methods take and return jnp arrays (float32).

  Attributes:
    betas: [N] betas of this (possibly respaced) schedule.
    timestep_map: [N] int, the model's original timestep for each index of this schedule.
  """

  betas: np.ndarray
  timestep_map: np.ndarray

  def __post_init__(self):
    b = np.asarray(self.betas, np.float64)
    if b.ndim != 1 or not np.all((b > 0) & (b <= 1)):
      raise ValueError('betas must be a 1-D array in (0, 1]')
    if np.asarray(self.timestep_map).shape != b.shape:
      raise ValueError('timestep_map must have the shape of betas')
    object.__setattr__(self, 'betas', b)
    object.__setattr__(self, 'timestep_map', np.asarray(self.timestep_map, np.int32))

  @classmethod
  def create(cls, kind: str, num_timesteps: int, **kw) -> NoiseSchedule:
    """Schedule ``kind`` (one of ``BETA_SCHEDULES``) with T = num_timesteps; ``kw`` go to its
    betas function (``scaled_linear`` needs ``beta_start`` and ``beta_end``)."""
    if kind not in _BETAS:
      raise ValueError(f'unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}')
    if kind == 'scaled_linear' and not {'beta_start', 'beta_end'} <= set(kw):
      raise ValueError("beta schedule 'scaled_linear' needs beta_start and beta_end")
    return cls(_BETAS[kind](num_timesteps, **kw), np.arange(num_timesteps))

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  # --- Derived host arrays (float64). ---
  @property
  def alphas(self) -> np.ndarray:
    return 1.0 - self.betas

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(self.alphas)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def posterior_variance(self) -> np.ndarray:
    """Fixed-small variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0."""
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  def variance(self, kind: str) -> np.ndarray:
    """Reverse-step variance: 'fixedsmall' (beta~_t) or 'fixedlarge' (beta_t, beta~_1 at t = 0)."""
    if kind == 'fixedsmall':
      return self.posterior_variance
    if kind == 'fixedlarge':
      if self.num_timesteps == 1:
        return self.betas.copy()
      return np.append(self.posterior_variance[1], self.betas[1:])
    raise ValueError(f"unknown variance {kind!r}; expected 'fixedsmall' or 'fixedlarge'")

  def respace(self, spec: int | str) -> NoiseSchedule:
    """Respaced schedule over the kept timesteps, with betas recomputed from abar.

    new_beta_i = 1 - abar[t_i] / abar[t_{i-1}], so the kept abar values are unchanged.
    """
    keep = space_timesteps(self.num_timesteps, spec)
    abar = self.alphas_cumprod
    last, betas = 1.0, []
    for t in keep:
      betas.append(1.0 - abar[t] / last)
      last = abar[t]
    return NoiseSchedule(np.asarray(betas), self.timestep_map[np.asarray(keep)])

  # --- Device-side math (jnp, float32). t may be a traced int array; -1 means "clean". ---
  def _take(self, arr: np.ndarray, t) -> jnp.ndarray:
    return jnp.asarray(arr, jnp.float32)[t]

  def abar(self, t) -> jnp.ndarray:
    """abar_t with abar_{-1} = 1 (t may be -1)."""
    table = np.append(self.alphas_cumprod, 1.0)  # index -1 wraps to the appended 1.0
    return self._take(table, t)

  def q_sample(self, x0: jnp.ndarray, t, noise: jnp.ndarray) -> jnp.ndarray:
    """Samples q(x_t | x_0). x0, noise: [B, H, W, C]; t: [B] or scalar index."""
    a = _bcast(self.abar(t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise

  def q_step(self, x_prev: jnp.ndarray, t, noise: jnp.ndarray) -> jnp.ndarray:
    """One forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
    b = _bcast(self._take(self.betas, t), x_prev)
    return jnp.sqrt(1.0 - b) * x_prev + jnp.sqrt(b) * noise

  def predict_x0(self, x_t: jnp.ndarray, t, eps: jnp.ndarray) -> jnp.ndarray:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = _bcast(self.abar(t), x_t)
    return (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)

  def predict_eps(self, x_t: jnp.ndarray, t, x0: jnp.ndarray) -> jnp.ndarray:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    a = _bcast(self.abar(t), x_t)
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)

  def posterior_mean(self, x0: jnp.ndarray, x_t: jnp.ndarray, t) -> jnp.ndarray:
    """Mean of q(x_{t-1} | x_t, x_0)."""
    abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
    c0 = self.betas * np.sqrt(abar_prev) / (1.0 - abar)
    ct = (1.0 - abar_prev) * np.sqrt(self.alphas) / (1.0 - abar)
    return _bcast(self._take(c0, t), x0) * x0 + _bcast(self._take(ct, t), x_t) * x_t

  def ddim_step(
    self,
    x_t: jnp.ndarray,
    t,
    t_prev,
    eps: jnp.ndarray,
    eta: float = 0.0,
    noise: jnp.ndarray | None = None,
    x0: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """DDIM update from index t to an earlier index t_prev (-1 = clean image).

    x_{t'} = sqrt(abar_{t'}) x0 + sqrt(1 - abar_{t'} - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}).
    Also used for the DDIM inversion (t_prev > t) with eta = 0.
    """
    a_t = _bcast(self.abar(t), x_t)
    a_p = _bcast(self.abar(t_prev), x_t)
    if x0 is None:
      x0 = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    if eta == 0.0:
      return jnp.sqrt(a_p) * x0 + jnp.sqrt(1.0 - a_p) * eps
    sigma = eta * jnp.sqrt((1.0 - a_p) / (1.0 - a_t)) * jnp.sqrt(jnp.maximum(1.0 - a_t / a_p, 0.0))
    if noise is None:
      raise ValueError('ddim_step with eta > 0 needs noise')
    return (
      jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_p - sigma**2, 0.0)) * eps + sigma * noise
    )

  def model_timesteps(self, t) -> jnp.ndarray:
    """The model's original timestep(s) for schedule index t."""
    return jnp.asarray(self.timestep_map)[t]


def _bcast(v: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a scalar or [B] coefficient to broadcast against [B, ...] without rank promotion."""
  v = jnp.asarray(v, like.dtype)
  if v.ndim == 0:
    return jnp.broadcast_to(v, (like.shape[0],) + (1,) * (like.ndim - 1))
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def make_schedule(cfg) -> NoiseSchedule:
  """Schedule from a config's ``diffusion`` section or ``model.json``'s ``diffusion`` dict
  (beta_schedule, num_timesteps, and beta_start/beta_end for ``RANGED_SCHEDULES``)."""
  get = cfg.__getitem__ if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
  kind = get('beta_schedule')
  if kind in RANGED_SCHEDULES:
    return NoiseSchedule.create(
      kind, get('num_timesteps'), beta_start=get('beta_start'), beta_end=get('beta_end')
    )
  return NoiseSchedule.create(kind, get('num_timesteps'))


# ----------------------------------------------------------------------------- step tables
# The time sequences restorers walk, built on the host (restore.py scans over them).


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


def ddim_times(t_start: int, steps: int) -> list[int]:
  """``steps`` timesteps evenly spread over [0, t_start - 1], descending, then -1 (clean)."""
  if steps == 1:  # one step from t_start - 1 (linspace would put the only step at t = 0)
    return [t_start - 1, -1]
  ts = np.unique(np.round(np.linspace(0, t_start - 1, steps)).astype(int))[::-1]
  if len(ts) != steps:
    raise ValueError(f'config.drc.steps {steps} > t_start {t_start}')
  return [int(t) for t in ts] + [-1]
