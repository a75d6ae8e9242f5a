"""Schedule numbers against hand-computed values, incl. the index conventions at 0 and T-1."""

import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.core import schedule as S


def test_linear_betas_ends_and_abar():
  s = S.NoiseSchedule.create('linear', 1000)
  assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
  assert s.alphas_cumprod[0] == pytest.approx(1 - 1e-4)  # t = 0 is one noising step
  assert s.alphas_cumprod_prev[0] == 1.0
  # abar_{T-1} for the DDPM linear schedule is about 4.04e-5 (a well known value).
  assert s.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)
  assert np.all(np.diff(s.alphas_cumprod) < 0)


def test_three_step_schedule_by_hand():
  s = S.NoiseSchedule(np.array([0.1, 0.2, 0.5]), np.arange(3))
  np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72, 0.36])
  np.testing.assert_allclose(s.alphas_cumprod_prev, [1.0, 0.9, 0.72])
  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
  np.testing.assert_allclose(s.posterior_variance, [0.0, 0.2 * 0.1 / 0.28, 0.5 * 0.28 / 0.64])
  np.testing.assert_allclose(s.variance('fixedlarge'), [0.2 * 0.1 / 0.28, 0.2, 0.5])
  x0, xt = jnp.full((1, 1, 1, 1), 2.0), jnp.full((1, 1, 1, 1), 3.0)
  # posterior mean coefficients at t = 1:
  # beta sqrt(abar_prev)/(1-abar), (1-abar_prev)sqrt(alpha)/(1-abar)
  want = 0.2 * np.sqrt(0.9) / 0.28 * 2.0 + 0.1 * np.sqrt(0.8) / 0.28 * 3.0
  assert float(s.posterior_mean(x0, xt, 1)[0, 0, 0, 0]) == pytest.approx(want, rel=1e-6)
  # at t = 0 the posterior mean is x0 itself
  assert float(s.posterior_mean(x0, xt, 0)[0, 0, 0, 0]) == pytest.approx(2.0, rel=1e-6)
  eps = jnp.full((1, 1, 1, 1), 0.5)
  x_t = s.q_sample(x0, jnp.array([2]), eps)
  assert float(x_t[0, 0, 0, 0]) == pytest.approx(0.6 * 2 + 0.8 * 0.5, rel=1e-6)
  assert float(s.predict_x0(x_t, jnp.array([2]), eps)[0, 0, 0, 0]) == pytest.approx(2.0, rel=1e-5)
  assert float(s.predict_eps(x_t, jnp.array([2]), x0)[0, 0, 0, 0]) == pytest.approx(0.5, rel=1e-5)
  # abar(-1) = 1: DDIM to "clean" returns x0 exactly.
  assert float(s.ddim_step(x_t, 2, -1, eps)[0, 0, 0, 0]) == pytest.approx(2.0, rel=1e-5)
  # forward single step: sqrt(1 - beta) x + sqrt(beta) z
  assert float(s.q_step(x0, 2, eps)[0, 0, 0, 0]) == pytest.approx(
    np.sqrt(0.5) * 2 + np.sqrt(0.5) * 0.5
  )


def test_ddim_step_deterministic_and_eta():
  s = S.NoiseSchedule(np.array([0.1, 0.2, 0.5]), np.arange(3))
  x0, eps, z = 1.5, -0.3, 0.7
  a_t, a_p = 0.36, 0.9
  xt = jnp.full((1, 1, 1, 1), np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps)
  e = jnp.full((1, 1, 1, 1), eps)
  got = float(s.ddim_step(xt, 2, 0, e)[0, 0, 0, 0])
  assert got == pytest.approx(np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps, rel=1e-5)
  sigma = np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
  want = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * eps + sigma * z
  got = float(s.ddim_step(xt, 2, 0, e, eta=1.0, noise=jnp.full((1, 1, 1, 1), z))[0, 0, 0, 0])
  assert got == pytest.approx(want, rel=1e-5)
  # Between consecutive steps, eta = 1 gives the DDPM posterior variance beta~_t.
  sig2 = (1 - 0.72) / (1 - 0.36) * (1 - 0.36 / 0.72)
  assert sig2 == pytest.approx(s.posterior_variance[2], rel=1e-12)


def test_respacing_keeps_abar_and_maps_timesteps():
  s = S.NoiseSchedule.create('linear', 1000)
  r = s.respace(250)
  assert r.num_timesteps == 250
  assert r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
  np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[r.timestep_map], rtol=1e-12)
  assert r.betas[0] == pytest.approx(1e-4)
  d = s.respace('ddim10')
  np.testing.assert_array_equal(d.timestep_map, np.arange(0, 1000, 100))
  assert S.space_timesteps(10, 4) == [0, 3, 6, 9]
  with pytest.raises(ValueError):
    S.space_timesteps(10, 11)
  assert int(r.model_timesteps(jnp.array(249))) == 999


def test_cosine_schedule():
  s = S.NoiseSchedule.create('cosine', 100)
  assert np.all((s.betas > 0) & (s.betas <= 0.999))
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  assert s.alphas_cumprod[9] == pytest.approx(f(10 / 100) / f(0), rel=1e-9)
  with pytest.raises(ValueError, match='unknown beta schedule'):
    S.NoiseSchedule.create('quadratic', 10)
