"""DRC and the baselines on a latent diffusion target: degrade and compare in pixel space, restore
on the latents (the mask carried to the latent grid), decode."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from conftest import load_config

from drc_jax.attacks import registry as attacks_lib
from drc_jax.audit import modes as pipeline
from drc_jax.audit import store
from drc_jax.core import config_base
from drc_jax.core import schedule as S
from drc_jax.drc import scorer as drc_lib
from drc_jax.models import latent as latent_lib

SCHED = S.NoiseSchedule.create('linear', 1000)
F = 4  # downsampling factor


@dataclasses.dataclass(frozen=True)
class SingleLatent:
  """The exact epsilon predictor of latent data that is one latent z* (a memorised member)."""

  z_star: jnp.ndarray

  def apply(self, params, z, t):
    del params
    a = SCHED.abar(t).reshape(-1, 1, 1, 1)
    return (z - jnp.sqrt(a) * self.z_star) / jnp.sqrt(1 - a)


class PoolAutoencoder:
  """encode: F x F average pooling; decode: nearest upsampling (exact on block-constant images)."""

  def encode(self, params, x):
    del params
    b, h, w, c = x.shape
    return x.reshape(b, h // F, F, w // F, F, c).mean(axis=(2, 4))

  def decode(self, params, z):
    del params
    return jnp.repeat(jnp.repeat(z, F, axis=1), F, axis=2)


def _drc_cfg(**kw):
  c = ml_collections.ConfigDict(config_base.base_config().drc.to_dict())
  c.update(kw)
  return c


def test_latent_keep_mask_keeps_only_fully_known_blocks():
  mask = np.ones((1, 8, 8, 1), np.float32)
  mask[0, 3, 5] = 0.0  # one removed pixel in latent block (0, 1)
  got = np.asarray(latent_lib.latent_keep_mask(jnp.asarray(mask), F))[0, ..., 0]
  np.testing.assert_array_equal(got, [[1.0, 0.0], [1.0, 1.0]])


def test_a_member_restores_exactly_through_the_latents():
  rng = np.random.default_rng(0)
  blocks = rng.uniform(-0.8, 0.8, (1, 4, 4, 3)).astype(np.float32)
  x_star = np.repeat(np.repeat(blocks, F, axis=1), F, axis=2)  # 16x16, constant on 4x4 blocks
  scaling = 2.0
  model = latent_lib.LatentModel(
    SingleLatent(jnp.asarray(scaling * blocks)), PoolAutoencoder(), scaling, (16, 16, 3), F
  )
  params = {'unet': None, 'vq': None}
  cfg = _drc_cfg(restorer='ddim', steps=10, num_restorations=2, mask='center_box', mask_ratio=0.25)
  scorer = drc_lib.make_drc(cfg, model, SCHED)
  images = jnp.asarray(np.concatenate([x_star, -x_star]))
  keys = drc_lib.image_keys(0, 2, np.array([0, 1]))
  degraded, restored = jax.jit(scorer.evidence)(params, keys, images)
  # The member comes back exactly (its latent is the only data); the other image's hole is
  # filled with the member's content, while its known pixels stay its own.
  np.testing.assert_allclose(
    np.asarray(restored[0]), np.broadcast_to(x_star, (2, 16, 16, 3)), atol=1e-4
  )
  hole = np.asarray(degraded[1, 0, ..., 0]) == 0.0  # the centre box: latent blocks (1..2, 1..2)
  assert hole.sum() == 64
  np.testing.assert_allclose(np.asarray(restored[1, 0])[hole], x_star[0][hole], atol=1e-4)
  np.testing.assert_allclose(np.asarray(restored[1, 0])[~hole], -x_star[0][~hole], atol=1e-4)
  sims = np.asarray(jax.jit(scorer.similarities)(params, keys, images))
  assert sims.shape == (2, 2) and np.all(sims[0] > -1e-6) and np.all(sims[1] < sims[0] - 0.01)


def test_baselines_score_the_latents():
  blocks = np.random.default_rng(1).uniform(-0.8, 0.8, (2, 4, 4, 3)).astype(np.float32)
  x = jnp.asarray(np.repeat(np.repeat(blocks, F, axis=1), F, axis=2))
  model = latent_lib.LatentModel(
    SingleLatent(jnp.zeros((1, 4, 4, 3))), PoolAutoencoder(), 0.5, (16, 16, 3), F
  )
  c = load_config('fashion_mnist', 'runlocal')
  names = ['loss', 'sima', 'rediffuse']  # ReDiffuse noises, denoises and compares latents
  keys = attacks_lib.keys_for(names, 0, np.array([3, 4]))
  params = {'unet': None, 'vq': None}
  latent = attacks_lib.make_attacks(c, model, SCHED, names)
  pixel = attacks_lib.make_attacks(c, model.unet, SCHED, names)
  z = 0.5 * jnp.asarray(blocks)
  for name in names:
    np.testing.assert_allclose(
      np.asarray(latent[name].scores(params, keys[name], x)),
      np.asarray(pixel[name].scores(params, keys[name], z)),
      rtol=1e-6,
    )


def test_ffhq_runlocal_audits_a_latent_target_with_every_attack(tmp_path):
  c = load_config('ffhq', 'runlocal')
  assert c.audit.checkpoint == 'random:ldm-tiny' and c.mode == 'audit'
  metrics = pipeline.run(c, str(tmp_path), c.mode)
  for name in ('drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse'):
    assert 0.0 <= metrics[name]['auc'] <= 1.0, name
  table = store.load_scores(str(tmp_path))
  assert table['drc/sim'].shape == (64, c.drc.num_restorations)
  assert os.path.exists(tmp_path / 'report.html')
  recorded = json.loads((tmp_path / store.AUDIT_CONFIG).read_text())
  assert recorded['audit']['checkpoint'] == 'random:ldm-tiny'


def test_ffhq_protocol_draws_members_from_the_training_range():
  c = load_config('ffhq')
  from drc_jax.data import splits  # pylint: disable=g-import-not-at-top

  m = splits.make_split('ffhq', 70000, 1000, 1000, 0, c.split.member_range, c.split.nonmember_range)
  assert m.members.max() < 60000 <= m.nonmembers.min() and len(m.members) == 1000
  assert c.diffusion.beta_schedule == 'scaled_linear' and c.data.resolution == 256
