"""Degraders, restorers and comparators against known answers (analytic denoisers), on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from drc_jax.core import config_base, parallel
from drc_jax.core import schedule as S
from drc_jax.drc import compare as C
from drc_jax.drc import degrade as D
from drc_jax.drc import restore as R
from drc_jax.drc import scorer as drc_lib
from drc_jax.models import unet as M

SCHED = S.NoiseSchedule.create('linear', 1000)


@dataclasses.dataclass(frozen=True)
class GaussianDataModel:
  """The exact epsilon predictor for data x0 ~ N(mu, s^2 I) (s = 0: a single training image)."""

  mu: float | np.ndarray
  s: float

  def apply(self, params, x, t):
    del params
    a = SCHED.abar(t).reshape(-1, 1, 1, 1)
    x0_mean = self.mu + jnp.sqrt(a) * self.s**2 / (a * self.s**2 + 1 - a) * (
      x - jnp.sqrt(a) * self.mu
    )
    return (x - jnp.sqrt(a) * x0_mean) / jnp.sqrt(1 - a)


def _drc_cfg(**kw):
  c = ml_collections.ConfigDict(config_base.base_config().drc.to_dict())
  c.update(kw)
  return c


def test_repaint_schedule_paper_setting():
  ts = S.repaint_jumps(250, 10, 10)
  assert S.repaint_counts(ts) == (2410, 2160)
  assert ts[0] == 249 and ts[-1] == -1 and set(np.abs(np.diff(ts))) == {1}
  assert S.repaint_counts(S.repaint_jumps(10, 10, 10)) == (10, 0)  # no room to jump
  r = R.make_restorer(
    _drc_cfg(restorer='repaint', steps=250, jump_length=10, jump_n_sample=10),
    GaussianDataModel(0.0, 0.0),
    SCHED,
  )
  assert (r.nfe, r.renoise_steps) == (2410, 2160)


@pytest.mark.parametrize(
  'restorer,kw',
  [
    ('repaint', dict(steps=25, jump_length=5, jump_n_sample=3)),
    ('ddim', dict(steps=20, t_start=1000)),
    ('ddim', dict(steps=10, t_start=300)),
    ('ddnm', dict(steps=20, t_start=1000)),
  ],
)
def test_single_training_image_is_restored_exactly(restorer, kw):
  x_star = np.random.default_rng(0).uniform(-0.9, 0.9, (1, 8, 8, 3)).astype(np.float32)
  model = GaussianDataModel(jnp.asarray(x_star), 0.0)  # the data distribution is one image
  images = jnp.asarray(np.repeat(x_star, 3, axis=0))
  cfg = _drc_cfg(restorer=restorer, mask='random_box', mask_ratio=0.4, **kw)
  keys = jax.random.split(jax.random.key(1), 3)
  d = D.make_degrader(cfg)(keys, images)
  out = np.asarray(R.make_restorer(cfg, model, SCHED).restore(None, keys, images, d))
  np.testing.assert_allclose(out, images, atol=2e-3)
  known = np.broadcast_to(np.asarray(d.mask), out.shape) > 0
  np.testing.assert_array_equal(out[known], np.asarray(images)[known])  # pasted back exactly


def test_repaint_samples_the_gaussian_prior_in_the_hole():
  mu, s = 0.2, 0.3  # inside [-1, 1]: the sampler clips x0 predictions to the data range
  model = GaussianDataModel(mu, s)
  n = 256
  images = jnp.full((n, 4, 4, 1), 0.9)
  cfg = _drc_cfg(
    restorer='repaint',
    steps=100,
    jump_length=5,
    jump_n_sample=2,
    mask='center_box',
    mask_ratio=0.25,
  )
  keys = jax.random.split(jax.random.key(0), n)
  d = D.make_degrader(cfg)(keys, images)
  out = np.asarray(R.make_restorer(cfg, model, SCHED).restore(None, keys, images, d))
  hole = np.asarray(d.mask)[0, ..., 0] == 0
  vals = out[:, hole, 0].ravel()  # independent pixels: the hole follows the prior N(mu, s^2)
  assert hole.sum() == 4
  assert abs(vals.mean() - mu) < 0.05 and abs(vals.std() - s) < 0.05, (vals.mean(), vals.std())


def test_ddnm_super_resolution_and_colorization_keep_the_measurement():
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  model = GaussianDataModel(0.0, 0.5)
  keys = jax.random.split(jax.random.key(0), 2)
  for kind in ('downsample', 'grayscale'):
    cfg = _drc_cfg(restorer='ddnm', steps=10, mask=kind, patch_size=2)
    d = D.make_degrader(cfg)(keys, x)
    np.testing.assert_allclose(d.forward(d.pinv(d.measurement, 3)), d.measurement, atol=1e-6)
    out = R.make_restorer(cfg, model, SCHED).restore(None, keys, x, d)
    np.testing.assert_allclose(d.forward(out), d.measurement, atol=1e-5)


def test_masks():
  x = jnp.zeros((4, 16, 16, 1))
  keys = jax.random.split(jax.random.key(3), 4)
  m = np.asarray(D.make_degrader(_drc_cfg(mask='center_box', mask_ratio=0.25))(keys, x).mask)
  assert (m[0, ..., 0] == 0).sum() == 64 and m[0, 4:12, 4:12, 0].max() == 0
  inv = np.asarray(
    D.make_degrader(_drc_cfg(mask='center_box', mask_ratio=0.25, invert_mask=True))(keys, x).mask
  )
  np.testing.assert_array_equal(inv, 1 - m)
  rb = np.asarray(D.make_degrader(_drc_cfg(mask='random_box', mask_ratio=0.25))(keys, x).mask)
  assert all((rb[i] == 0).sum() == 64 for i in range(4))
  assert len({rb[i].tobytes() for i in range(4)}) > 1  # per-image masks in one batch
  rp = np.asarray(
    D.make_degrader(_drc_cfg(mask='random_patches', mask_ratio=0.5, patch_size=4))(keys, x).mask
  )
  assert all((rp[i] == 0).sum() == 8 * 16 for i in range(4))
  img = np.full((1, 16, 16, 1), -1.0, np.float32)
  img[0, 0:4, 12:16] = 1.0  # one bright patch on a dark background: the salient one
  sp = np.asarray(
    D.make_degrader(_drc_cfg(mask='saliency_patches', mask_ratio=1 / 16, patch_size=4))(
      keys[:1], jnp.asarray(img)
    ).mask
  )
  assert sp[0, 0:4, 12:16].max() == 0 and sp.sum() == 256 - 16
  again = np.asarray(D.make_degrader(_drc_cfg(mask='random_box', mask_ratio=0.25))(keys, x).mask)
  np.testing.assert_array_equal(rb, again)  # deterministic given the keys


def test_comparators_by_hand():
  x = jnp.zeros((1, 4, 4, 1))
  y = x.at[0, 0, 0, 0].set(1.0).at[0, 3, 3, 0].set(2.0)
  mask = jnp.ones((1, 4, 4, 1)).at[0, :2, :2, 0].set(0.0)  # region = the top-left 2x2
  d = D.Degradation(x * mask, mask)
  assert float(C.neg_masked_mse(x, y, d)[0]) == pytest.approx(-0.25)  # (1^2 + 0 + 0 + 0) / 4
  assert float(C.psnr(x, y, d)[0]) == pytest.approx(10 * np.log10(4 / 0.25))
  img = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  full = D.Degradation(img, jnp.zeros((2, 16, 16, 1)))
  np.testing.assert_allclose(C.ssim(img, img, full), 1.0, atol=1e-6)
  np.testing.assert_allclose(C.ssim_region(img, img, full), 1.0, atol=1e-6)
  other = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  assert abs(float(C.ssim(img, other, full)[0])) < 0.1  # independent noise: no structure shared
  assert 0.1 < float(C.ssim(img, 0.5 * img + 0.5 * other, full)[0]) < 0.9
  enc = C.feature_cosine(lambda z: z.reshape(z.shape[0], -1))
  np.testing.assert_allclose(enc(img, 2 * img, full), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match='comparator'):
    C.get('lpips')


def _tiny_unet():
  cfg = M.UNetConfig(
    resolution=8,
    in_channels=1,
    out_channels=1,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_res=(4,),
    norm_groups=8,
  )
  model, params = M.DiffusionModel.create(cfg, seed=1)
  # Give the zero-initialised output layers some weight so the network is not ~0.
  params = jax.tree_util.tree_map(
    lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params
  )
  return model, params


def test_sharded_restore_is_identical_on_1_2_4_8_devices_and_traces_once():
  model, params = _tiny_unet()
  cfg = _drc_cfg(restorer='repaint', steps=6, jump_length=2, jump_n_sample=2, mask='random_box')
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
  keys = jax.random.split(jax.random.key(5), 16)
  outs = []
  for n_dev in (1, 2, 4, 8):
    mesh = parallel.make_mesh(jax.devices()[:n_dev])
    r = R.make_restorer(cfg, model, SCHED)
    restore = jax.jit(r.restore, **parallel.shardings(mesh, 'rddd', 'd'))
    d = D.make_degrader(cfg)(keys, x)
    outs.append(np.asarray(restore(params, keys, x, d)))
    x2 = x[::-1] * 0.5  # another batch of the same shape
    restore(params, keys, x2, D.make_degrader(cfg)(keys, x2))
    assert restore._cache_size() == 1  # one trace, one compiled program
  for out in outs[1:]:  # 1, 2, 4 and 8 devices restore identically
    np.testing.assert_allclose(outs[0], out, atol=1e-5)
  # Per-image keys: an image's restoration does not depend on its batch.
  r = R.make_restorer(cfg, model, SCHED)
  d = D.make_degrader(cfg)(keys, x)
  sub = R.make_restorer(cfg, model, SCHED).restore(
    params, keys[3:5], x[3:5], D.make_degrader(cfg)(keys[3:5], x[3:5])
  )
  np.testing.assert_allclose(np.asarray(sub), outs[0][3:5], atol=1e-5)


def test_debug_python_loop_equals_scan():
  model, params = _tiny_unet()
  cfg = _drc_cfg(restorer='ddim', steps=5, t_start=600, eta=0.5)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  keys = jax.random.split(jax.random.key(2), 2)
  d = D.make_degrader(cfg)(keys, x)
  fast = R.make_restorer(cfg, model, SCHED).restore(params, keys, x, d)
  slow = R.make_restorer(cfg, model, SCHED, debug=True).restore(params, keys, x, d)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=1e-5)
  again = R.make_restorer(cfg, model, SCHED).restore(params, keys, x, d)
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(again))  # same key, same output


def test_drc_scores_members_closer():
  """With the single-image analytic model, that image restores perfectly, another does not."""
  x_star = np.random.default_rng(0).uniform(-0.9, 0.9, (1, 8, 8, 1)).astype(np.float32)
  model = GaussianDataModel(jnp.asarray(x_star), 0.0)
  other = -x_star
  cfg = _drc_cfg(restorer='ddim', steps=10, num_restorations=3, mask='center_box')
  scorer = drc_lib.make_drc(cfg, model, SCHED)
  assert scorer.nfe == 30
  images = jnp.asarray(np.concatenate([x_star, other]))
  sims = np.asarray(scorer.similarities(None, drc_lib.image_keys(0, 2, np.array([0, 1])), images))
  assert sims.shape == (2, 3)
  assert sims[0].min() > -1e-5 and sims[1].max() < -0.01
  degraded, restored = scorer.evidence(None, drc_lib.image_keys(0, 2, np.array([0, 1])), images)
  assert degraded.shape == restored.shape == (2, 3) + images.shape[1:]  # all K restorations
  # The evidence is exactly what was scored: restoration k of image b gives similarity [b, k].
  comparator = C.get(cfg.comparator)
  for k in range(3):
    region = D.Degradation(images, jnp.asarray(degraded[:, k] != 0, jnp.float32)[..., :1])
    np.testing.assert_allclose(comparator(images, restored[:, k], region), sims[:, k], atol=1e-6)
  np.testing.assert_array_equal(drc_lib.votes(sims, -1e-3), [3, 0])


def test_ddim_from_t_start_starts_the_hole_from_fresh_noise():
  """t_start < T: the hole starts as unit noise, not the noised mid-grey fill."""
  mu, s, n = 0.5, 0.3, 512
  model = GaussianDataModel(mu, s)
  images = jnp.full((n, 4, 4, 1), -0.5)
  t0 = 300
  cfg = _drc_cfg(restorer='ddim', steps=1, t_start=t0, mask='center_box', mask_ratio=0.25)
  keys = jax.random.split(jax.random.key(4), n)
  d = D.make_degrader(cfg)(keys, images)
  out = np.asarray(R.make_restorer(cfg, model, SCHED).restore(None, keys, images, d))
  hole = np.asarray(d.mask)[0, ..., 0] == 0
  vals = out[:, hole, 0].ravel()
  # One DDIM step to t = -1 returns x0_hat(x_t0) = mu + g (x_t0 - sqrt(a) mu), g as below.
  a = float(SCHED.abar(t0))
  g = np.sqrt(a) * s**2 / (a * s**2 + 1 - a)
  assert abs(vals.mean() - (mu - g * np.sqrt(a) * mu)) < 0.02, vals.mean()
  assert abs(vals.std() - g) < 0.02, (vals.std(), g)  # unit noise; the grey start gave g*sqrt(1-a)


def test_batched_restorations_equal_the_scan_over_k():
  """drc.restorations='batch' (one batch of K x B) restores what the scan over K restores."""
  model, params = _tiny_unet()
  x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
  keys = drc_lib.image_keys(0, 2, np.arange(3))
  out = {}
  for how in ('scan', 'batch'):
    cfg = _drc_cfg(restorer='repaint', steps=6, jump_length=2, jump_n_sample=2, mask='random_box')
    cfg.num_restorations, cfg.restorations = 3, how
    scorer = drc_lib.make_drc(cfg, model, SCHED)
    out[how] = np.asarray(jax.jit(scorer.similarities)(params, keys, x))
  assert out['scan'].shape == (3, 3)
  np.testing.assert_allclose(out['batch'], out['scan'], rtol=1e-5, atol=1e-6)
