"""The attack registry's baselines against scores computed by hand in NumPy on a linear model
``eps(x, t) = c x`` (every term has a closed form), and the per-image keys they draw from.
ReDiffuse runs on a nonlinear model that depends on t (a wrong timestep changes its score)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from drc_jax.attacks import registry
from drc_jax.audit import validate
from drc_jax.core import config_base, streams
from drc_jax.core import schedule as schedule_lib

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
  c.attacks.update(rediffuse_t=150, rediffuse_k=50, rediffuse_n=3)
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


class TimedModel:
  """eps(x, t) = tanh(params x) (1 + t / 1000), counting its calls (each is one per image)."""

  is_latent = False

  def __init__(self):
    self.calls = 0

  def apply(self, params, x, t):
    self.calls += 1
    return jnp.tanh(params * x) * (1.0 + t[:, None, None, None] / 1000.0)


def _rediffuse_by_hand(abar, x0, key_data, t, k, n):
  """NumPy float64: n variations x0 -> x_t (noise of draw i: fold_in(image key, i)) -> DDIM
  (eta = 0) t, t - k, ..., 0; minus the squared distance of their mean to x0."""
  out = []
  for b in range(len(x0)):
    recons = []
    for i in range(n):
      key = jax.random.fold_in(jax.random.wrap_key_data(key_data[b]), i)
      eps = np.asarray(jax.random.normal(key, x0.shape[1:]), np.float64)
      x = np.sqrt(abar[t]) * x0[b] + np.sqrt(1 - abar[t]) * eps
      for j in range(t, 0, -k):
        e = np.tanh(C * x) * (1 + j / 1000)
        pred = (x - np.sqrt(1 - abar[j]) * e) / np.sqrt(abar[j])
        x = np.sqrt(abar[j - k]) * pred + np.sqrt(1 - abar[j - k]) * e
      recons.append(x)
    out.append(-np.sum((x0[b] - np.mean(recons, axis=0)) ** 2))
  return np.asarray(out)


def test_rediffuse_by_hand_with_the_images_own_noise():
  schedule = schedule_lib.NoiseSchedule.create('linear', 1000, beta_start=1e-4, beta_end=0.02)
  x0 = np.random.default_rng(1).uniform(-1, 1, (3, 8, 8, 2)).astype(np.float32)
  keys = registry.keys_for(['rediffuse'], seed=5, indices=np.array([4, 9, 11]))['rediffuse']
  attack = registry.make_attacks(_config(), TimedModel(), schedule, ['rediffuse'])['rediffuse']
  got = np.asarray(jax.jit(attack.scores)(np.float32(C), keys, x0), np.float64)
  want = _rediffuse_by_hand(schedule.alphas_cumprod, x0.astype(np.float64), keys, 150, 50, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # each image's score is its own: alone, it scores the same
  alone = np.asarray(jax.jit(attack.scores)(np.float32(C), keys[1:2], x0[1:2]), np.float64)
  np.testing.assert_allclose(alone, got[1:2], rtol=1e-6)


@pytest.mark.parametrize('fields', [None, dict(rediffuse_t=150, rediffuse_k=50, rediffuse_n=3)])
def test_rediffuse_counts_its_model_calls_and_is_black_box(fields):
  config = config_base.base_config() if fields is None else _config()
  model = TimedModel()
  schedule = schedule_lib.NoiseSchedule.create('linear', 1000)
  attack = registry.ATTACKS['rediffuse'](config, model, schedule)
  x0 = np.zeros((2, 4, 4, 1), np.float32)
  keys = registry.keys_for(['rediffuse'], seed=0, indices=np.array([0, 1]))['rediffuse']
  with jax.disable_jit():  # every model call runs in Python: the counter sees each one
    attack.scores(np.float32(C), keys, x0)
  a = config.attacks
  assert model.calls == attack.nfe == a.rediffuse_n * (a.rediffuse_t // a.rediffuse_k)
  if fields is None:
    assert attack.nfe == 20  # the defaults: n = 10 draws of t / k = 200 / 100 steps
  assert attack.access == 'black-box'
