"""The attack registry's baselines against scores computed by hand in NumPy on a linear model
``eps(x, t) = c x`` (every term has a closed form), and the per-image keys they draw from."""

import jax
import ml_collections
import numpy as np
import pytest

from drc_jax.attacks import registry
from drc_jax.audit import validate
from drc_jax.core import schedule as schedule_lib
from drc_jax.core import streams

C = 0.7  # the model's only parameter


class LinearModel:
  """eps(x, t) = params * x: no network, so each attack's score has a closed form."""

  is_latent = False

  def apply(self, params, x, t):
    del t
    return params * x


def _config():
  c = ml_collections.ConfigDict()
  c.attacks = dict(loss_t=200, secmi_t=100, secmi_k=10, pia_t=200, pia_p=4, sima_t=100)
  return c


@pytest.fixture(scope='module')
def setup():
  schedule = schedule_lib.NoiseSchedule.create('linear', 1000, beta_start=1e-4, beta_end=0.02)
  x0 = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  keys = registry.keys_for(['loss'], seed=5, indices=np.array([4, 9, 11]))['loss']
  attacks = registry.make_attacks(
    _config(), LinearModel(), schedule, ['loss', 'secmi', 'pia', 'pian', 'sima']
  )
  out = {n: np.asarray(a.scores(np.float32(C), keys, x0), np.float64) for n, a in attacks.items()}
  return schedule.alphas_cumprod.astype(np.float64), x0.astype(np.float64), keys, out, attacks


def _sum(v):
  return v.sum(axis=(1, 2, 3))


def test_sima_and_pia_by_hand(setup):
  abar, x0, _, out, _ = setup
  np.testing.assert_allclose(out['sima'], -_sum(np.abs(C * x0) ** 4), rtol=1e-5)
  eps0 = C * x0
  a = abar[200]
  xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps0
  np.testing.assert_allclose(out['pia'], -_sum(np.abs(eps0 - C * xt) ** 4), rtol=1e-4)
  eps0n = eps0 / np.abs(eps0).mean(axis=(1, 2, 3), keepdims=True) * np.sqrt(2 / np.pi)
  xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps0n
  np.testing.assert_allclose(out['pian'], -_sum(np.abs(eps0n - C * xt) ** 4), rtol=1e-4)


def test_loss_by_hand_with_the_images_own_noise(setup):
  abar, x0, keys, out, _ = setup
  a = abar[200]
  for b in range(3):
    eps = np.asarray(jax.random.normal(jax.random.wrap_key_data(keys[b]), x0.shape[1:]), np.float64)
    xt = np.sqrt(a) * x0[b] + np.sqrt(1 - a) * eps
    np.testing.assert_allclose(out['loss'][b], -np.sum((eps - C * xt) ** 2), rtol=1e-4)


def test_secmi_by_hand(setup):
  abar, x0, _, out, attacks = setup

  def ddim(x, t_from, t_to):
    eps = C * x
    pred = (x - np.sqrt(1 - abar[t_from]) * eps) / np.sqrt(abar[t_from])
    return np.sqrt(abar[t_to]) * pred + np.sqrt(1 - abar[t_to]) * eps

  x = x0
  for t in range(0, 90, 10):
    x = ddim(x, t, t + 10)
  recon = ddim(ddim(x, 90, 100), 100, 90)
  np.testing.assert_allclose(out['secmi'], -_sum((x - recon) ** 2), rtol=1e-3)
  assert attacks['secmi'].nfe == 11  # (t_sec / k - 1) + 2 model calls


def test_keys_are_per_image_and_per_attack():
  a = registry.keys_for(['loss', 'drc'], seed=0, indices=np.array([3, 7]))
  b = registry.keys_for(['loss', 'drc'], seed=0, indices=np.array([7]))
  np.testing.assert_array_equal(a['loss'][1], b['loss'][0])  # an image's key: its index alone
  assert not np.array_equal(a['loss'], a['drc'])  # each attack its own stream
  assert set(streams.ATTACKS) >= set(registry.ATTACKS)


def test_validation_names_the_registry():
  assert set(validate.ATTACKS) == set(registry.ATTACKS)
