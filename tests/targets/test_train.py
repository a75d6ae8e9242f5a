"""Training on real Fashion-MNIST members: loss goes down, resume is exact, sharding is exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.core import parallel
from drc_jax.data import sources as data_lib
from drc_jax.targets import checkpoints
from drc_jax.targets import train as T
from drc_jax.targets.load import load_target


def _members(cfg, n=64):
  src = data_lib.FashionMnistSource('train')
  return data_lib.load_images(src, np.arange(n), cfg.data)[0]


def _fixed_loss(model, schedule, params, images):
  """Loss on fixed (t, eps) draws: comparable before and after training."""
  key = jax.random.key(123)
  t = jax.random.randint(key, (images.shape[0],), 0, schedule.num_timesteps)
  eps = jax.random.normal(jax.random.fold_in(key, 1), images.shape)
  pred = model.apply(params, schedule.q_sample(images, t, eps), t)
  return float(jnp.mean(jnp.square(pred - eps)))


def test_a_few_steps_lower_the_loss_on_real_images(fmnist_local):
  cfg = fmnist_local
  cfg.train.lr, cfg.train.warmup_steps, cfg.train.random_flip = 1e-3, 1, False
  images = _members(cfg)
  _, model, params, schedule, tx = T.build(cfg)
  mesh = parallel.make_mesh(jax.devices()[:1])  # sharding is tested below; one device is faster
  step = T.make_train_step(model, schedule, tx, cfg.train, mesh)
  state = parallel.replicate(mesh, T.init_state(params, tx))
  before = _fixed_loss(model, schedule, params, images)
  key = jax.random.key(0)
  for i in range(30):
    rows = images[T.batch_indices(i, len(images), 16, 0)]
    state, _ = step(
      state, parallel.shard_batch(mesh, rows), parallel.shard_batch(mesh, np.ones(16, bool)), key
    )
  after = _fixed_loss(model, schedule, state['params'], images)
  assert after < 0.8 * before, (before, after)


def test_sharded_step_matches_one_device(fmnist_local):
  cfg = fmnist_local
  images = _members(cfg, 16)
  _, model, params, schedule, tx = T.build(cfg)
  params = jax.device_get(params)  # host copy: each run donates its own device buffers
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = parallel.make_mesh(devices)
    step = T.make_train_step(model, schedule, tx, cfg.train, mesh)
    state = parallel.replicate(mesh, T.init_state(params, tx))
    valid = np.ones(16, bool)
    valid[-3:] = False  # padding rows must not count
    state, metrics = step(
      state,
      parallel.shard_batch(mesh, images),
      parallel.shard_batch(mesh, valid),
      jax.random.key(7),
    )
    results.append((float(metrics['loss']), jax.device_get(state['params'])))
  assert len(jax.devices()) == 8
  assert abs(results[0][0] - results[1][0]) <= 1e-5
  for a, b in zip(
    jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])
  ):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_resume_continues_exactly(fmnist_local, tmp_path):
  cfg = fmnist_local
  cfg.train.steps, cfg.train.checkpoint_every, cfg.split.num_members = 8, 4, 24
  straight = T.train(cfg, str(tmp_path / 'straight'))
  cfg.train.steps = 4  # the "killed" run stops right after its checkpoint at step 4
  T.train(cfg, str(tmp_path / 'resumed'))
  assert T.trained_steps(str(tmp_path / 'resumed')) == 4
  cfg.train.steps = 8  # rerun the same command: it continues from step 4
  resumed = T.train(cfg, str(tmp_path / 'resumed'))
  assert int(resumed['step']) == 8
  for a, b in zip(
    jax.tree_util.tree_leaves(jax.device_get(straight)),
    jax.tree_util.tree_leaves(jax.device_get(resumed)),
  ):
    np.testing.assert_array_equal(a, b)
  target = load_target(str(tmp_path / 'resumed'))
  assert target.step == 8
  np.testing.assert_array_equal(
    jax.tree_util.tree_leaves(target.params)[0],
    jax.tree_util.tree_leaves(jax.device_get(resumed['ema_params']))[0],
  )


def test_batch_indices_are_epoch_permutations():
  idx = np.concatenate([T.batch_indices(s, 10, 4, 0) for s in range(5)])  # 20 = 2 epochs
  assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
  np.testing.assert_array_equal(T.batch_indices(3, 10, 4, 0), T.batch_indices(3, 10, 4, 0))


def test_checkpoint_of_another_architecture_is_refused(fmnist_local, tmp_path):
  cfg = fmnist_local
  cfg.train.steps, cfg.train.checkpoint_every = 2, 2
  T.train(cfg, str(tmp_path))
  unet, diffusion = checkpoints.load_model_json(str(tmp_path))
  bigger = unet.to_dict()
  bigger['ch'] = 32
  from drc_jax.models import unet as model_lib

  checkpoints.save_model_json(str(tmp_path), model_lib.UNetConfig.from_dict(bigger), diffusion)
  with pytest.raises(checkpoints.CheckpointError, match='does not match'):
    load_target(str(tmp_path))
  with pytest.raises(checkpoints.CheckpointError, match='another architecture'):
    T.train(cfg, str(tmp_path))  # refuses; model.json and checkpoints stay as they were
  assert checkpoints.load_model_json(str(tmp_path))[0].ch == 32
  with pytest.raises(checkpoints.CheckpointError, match='does not exist'):
    load_target(str(tmp_path / 'empty'))


def test_ema_warms_up(fmnist_local):
  """EMA decay min(decay, (1 + step) / (10 + step)): step 0 keeps 10% of the initial weights."""
  cfg = fmnist_local
  images = _members(cfg, 16)
  _, model, params, schedule, tx = T.build(cfg)
  params = jax.device_get(params)
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = T.make_train_step(model, schedule, tx, cfg.train, mesh)
  state = parallel.replicate(mesh, T.init_state(params, tx))
  state, _ = step(
    state,
    parallel.shard_batch(mesh, images),
    parallel.shard_batch(mesh, np.ones(16, bool)),
    jax.random.key(0),
  )
  new = jax.device_get(state)
  for p0, p1, e in zip(
    *(jax.tree_util.tree_leaves(t) for t in (params, new['params'], new['ema_params']))
  ):
    np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-7)


def test_relative_workdir(fmnist_local, tmp_path, monkeypatch):
  """`python -m drc_jax.main` defaults to the relative workdir runs/<config>: orbax needs care."""
  monkeypatch.chdir(tmp_path)
  cfg = fmnist_local
  cfg.train.steps, cfg.train.checkpoint_every = 2, 1
  T.train(cfg, 'runs/rel')
  assert T.trained_steps('runs/rel') == 2 and load_target('runs/rel').step == 2


def test_training_on_other_members_is_refused(fmnist_local, tmp_path):
  """model.json records what the target was trained on; resuming on other members is refused."""
  cfg = fmnist_local
  cfg.train.steps, cfg.train.checkpoint_every = 2, 2
  T.train(cfg, str(tmp_path / 'w'))
  trained_on = checkpoints.trained_on(str(tmp_path / 'w'))
  assert trained_on['dataset'] == 'fashion_mnist/train' and trained_on['num_members'] == 32
  assert len(trained_on['member_indices_sha256']) == len(trained_on['member_images_sha256']) == 64
  split = json.loads((tmp_path / 'w' / 'split.json').read_text())
  np.savez(
    tmp_path / 'other.npz',
    mia_train_idxs=np.asarray(split['members']) + 1,
    mia_eval_idxs=np.asarray(split['nonmembers']) + 1,
  )
  cfg.split.file = str(tmp_path / 'other.npz')
  cfg.train.steps = 4
  with pytest.raises(data_lib.DataError, match='trained on other data .*member_indices_sha256'):
    T.train(cfg, str(tmp_path / 'w'))
  assert T.trained_steps(str(tmp_path / 'w')) == 2
