"""Inputs checked before any work: config gaps, split files, model.json, the target's schedule."""

import json

import numpy as np
import pytest
from conftest import load_config

from drc_jax.audit import scoring as A
from drc_jax.audit import store, validate
from drc_jax.core import config_base
from drc_jax.data import sources as D
from drc_jax.data import splits as S
from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints
from drc_jax.targets.load import load_target


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('audit.max_images', -1, 'config.audit.max_images: -1'),
    ('audit.shard_size', 0, 'config.audit.shard_size: 0'),
    ('audit.shard_size', -16, 'config.audit.shard_size: -16'),
    ('attacks.secmi_t', 95, 'config.attacks.secmi_t: 95 must be a multiple of secmi_k=10'),
    ('attacks.secmi_t', 5, r'config.attacks.secmi_t: 5 must be a multiple of secmi_k=10 in \[10,'),
    ('attacks.secmi_k', 0, 'config.attacks.secmi_k: 0'),
    ('attacks.rediffuse_t', 150, 'config.attacks.rediffuse_t: 150 must be a multiple of'),
    ('attacks.rediffuse_t', 1000, r'config.attacks.rediffuse_t: 1000 .* in \[100, 1000\)'),
    ('attacks.rediffuse_k', 0, 'config.attacks.rediffuse_k: 0'),
    ('attacks.rediffuse_n', 0, 'config.attacks.rediffuse_n: 0'),
    ('train.checkpoint_every', 0, 'config.train.checkpoint_every: 0'),
    ('drc.steps', 1001, r'config.drc.steps: 1001 not in \[1, 1000\]'),  # RePaint, T = 1000
  ],
)
def test_config_gaps_are_named(field, value, match):
  c = load_config('fashion_mnist')
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(validate.ConfigError, match=match):
    validate.check(c)


def test_split_indices_must_be_whole_numbers(tmp_path):
  np.savez(
    tmp_path / 'float.npz', mia_train_idxs=np.array([1.5, 2.0]), mia_eval_idxs=np.array([3, 4])
  )
  with pytest.raises(D.DataError, match=r'float.npz: split: members index 1.5 is not a whole'):
    S.load(str(tmp_path / 'float.npz'))
  np.savez(
    tmp_path / 'whole.npz', mia_train_idxs=np.array([1.0, 2.0]), mia_eval_idxs=np.array([3, 4])
  )
  np.testing.assert_array_equal(S.load(str(tmp_path / 'whole.npz')).members, [1, 2])
  (tmp_path / 'bad.json').write_text(
    json.dumps({'dataset': 'x', 'members': [0.25], 'nonmembers': [1]})
  )
  with pytest.raises(D.DataError, match='bad.json: split: members index 0.25'):
    S.load(str(tmp_path / 'bad.json'))


def test_an_empty_member_list_is_refused_before_scoring(tmp_path):
  np.savez(
    tmp_path / 'empty.npz', mia_train_idxs=np.array([], np.int64), mia_eval_idxs=np.array([3, 4])
  )
  cfg = config_base.base_config().split
  cfg.file = str(tmp_path / 'empty.npz')
  with pytest.raises(D.DataError, match='empty.npz: no members'):
    S.resolve(cfg, D.FashionMnistSource('train'), str(tmp_path / 'w'))


def test_garbage_model_json_names_the_path(fmnist_local, tmp_path):
  _write_target(str(tmp_path), fmnist_local, num_timesteps=1000)
  (tmp_path / 'model.json').write_text('{"unet": ')
  with pytest.raises(checkpoints.CheckpointError, match=f'{tmp_path}/model.json: not valid JSON'):
    checkpoints.is_imported(str(tmp_path))
  with pytest.raises(checkpoints.CheckpointError, match=f'{tmp_path}/model.json'):
    load_target(str(tmp_path))
  (tmp_path / 'model.json').write_text('[1, 2]')
  with pytest.raises(checkpoints.CheckpointError, match='expected a JSON object'):
    checkpoints.load_model_json(str(tmp_path))
  (tmp_path / 'model.json').write_text('{"unet": {}, "diffusion": {"num_timesteps": 10}}')
  with pytest.raises(checkpoints.CheckpointError, match='invalid model description'):
    checkpoints.load_model_json(str(tmp_path))


def _write_target(workdir, config, num_timesteps: int, source: str = 'converted:test'):
  """A target of random weights whose model.json records ``num_timesteps``."""
  unet = model_lib.unet_config_from(config.model, config.data.resolution, config.data.channels)
  _, params = model_lib.DiffusionModel.create(unet)
  checkpoints.save_params_only(workdir, params)
  checkpoints.save_model_json(
    workdir,
    unet,
    {
      'num_timesteps': num_timesteps,
      'beta_schedule': 'linear',
      'beta_start': 1e-4,
      'beta_end': 0.02,
    },
    source=source,
  )


def test_attack_timesteps_are_checked_against_the_targets_schedule(fmnist_local, tmp_path):
  """A target with T = 10 audited at the config's t = 100..500: refused before scoring."""
  wd = str(tmp_path)
  _write_target(wd, fmnist_local, num_timesteps=10)
  with pytest.raises(
    validate.ConfigError,
    match=r'config.attacks.loss_t: 200 not in \[0, 10\) '
    r'\(num_timesteps of the target in',
  ):
    A.run_audit(fmnist_local, wd)
  assert not (tmp_path / 'scores').exists() and not (tmp_path / store.AUDIT_CONFIG).exists()
  fmnist_local.attacks.names = 'secmi'
  with pytest.raises(validate.ConfigError, match='config.attacks.secmi_t: 100 .* in \\[10, 10\\)'):
    A.run_audit(fmnist_local, wd)
  fmnist_local.attacks.names = 'drc'
  fmnist_local.drc.restorer, fmnist_local.drc.t_start = 'ddim', 500
  with pytest.raises(validate.ConfigError, match=r'config.drc.t_start: 500 not in \[1, 10\]'):
    A.run_audit(fmnist_local, wd)
  fmnist_local.drc.restorer, fmnist_local.drc.steps = 'repaint', 50  # RePaint: its steps
  with pytest.raises(validate.ConfigError, match=r'config.drc.steps: 50 not in \[1, 10\]'):
    A.run_audit(fmnist_local, wd)
