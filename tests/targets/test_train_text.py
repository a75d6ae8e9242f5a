"""Training a text-conditioned target here (targets/train_text.py): exact resume, the workdir as a
Stable Diffusion target, caption dropout, refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.data import sources as data_lib
from drc_jax.targets import checkpoints, sd
from drc_jax.targets import train as T
from drc_jax.targets import train_text as TT
from drc_jax.targets.load import load_target

CLASSES = ', '.join(f'a photo of a {n.lower()}' for n in data_lib.FASHION_MNIST_CLASSES)


@pytest.fixture
def text_cfg(fmnist_local):
  """A tiny text-conditioned config: 8x8 Fashion-MNIST, class captions, 2 steps."""
  c = fmnist_local
  c.data.resolution = 8
  c.split.num_members = 16
  c.train.steps, c.train.batch_size, c.train.checkpoint_every, c.train.log_every = 2, 8, 1, 1
  c.text.captions = 'class_template'
  c.text.template = 'a photo of a {}'
  m = TT.default_text_model(CLASSES)
  m.block_out_channels, m.norm_num_groups = (16, 32), 8
  m.text_hidden_size, m.text_layers, m.text_intermediate_size = 16, 1, 32
  m.text_max_length, m.tokenizer_merges = 8, 40
  c.text_model = m
  return c


def _leaves(tree):
  return jax.tree_util.tree_leaves(jax.device_get(tree))


def test_trains_resumes_exactly_and_loads_as_a_stable_diffusion_target(text_cfg, tmp_path):
  cfg = text_cfg
  straight = T.train(cfg, str(tmp_path / 'straight'))
  w = str(tmp_path / 'resumed')
  cfg.train.steps = 1  # a run stopped after its first checkpoint, then run again to 2 steps
  T.train(cfg, w)
  assert T.trained_steps(w) == 1 and load_target(w).step == 1
  cfg.train.steps = 2
  resumed = T.train(cfg, w)
  assert T.trained_steps(w) == 2 and int(resumed['step']) == 2
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)

  target = load_target(w)
  assert isinstance(target, sd.SDTarget) and target.step == 2 and target.source == 'drc_jax'
  assert target.vae is None and target.downsampling_factor == 1 and target.scaling_factor == 1.0
  assert target.latent_channels == 1 and not target.is_inpainting
  for a, b in zip(_leaves(target.params['unet']), _leaves(resumed['ema_params'])):
    np.testing.assert_array_equal(a, b)
  doc = json.loads((tmp_path / 'resumed' / 'model.json').read_text())
  assert doc['vae'] is None and doc['trained_on'] == checkpoints.trained_on(w)
  assert doc['trained_on']['num_members'] == 16 and doc['text_model']['block_out_channels'] == [
    16,
    32,
  ]
  ids = target.tokenize(['a photo of a sneaker', ''])
  assert ids.shape == (2, 8)
  x = np.zeros((2, 8, 8, 1), np.float32)
  out = target.apply(target.encode(x), jnp.array([10, 500]), target.encode_text(ids))
  assert out.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(out)).all()
  assert target.decode(out).shape == (2, 8, 8, 1)

  # the audit's checks of the workdir (audit/modes.py): trained here, the config matches it
  assert not checkpoints.is_imported(w)
  checkpoints.check_config_matches(w, cfg)
  cfg.text_model.text_layers = 2
  with pytest.raises(checkpoints.CheckpointError, match=r'text_model\.text_layers: 2'):
    checkpoints.check_config_matches(w, cfg)
  with pytest.raises(checkpoints.CheckpointError, match=r'model\.json.*text_encoder'):
    T.train(cfg, w)  # another text tower: refused, nothing written
  cfg.text_model.text_layers = 1
  cfg.seed += 1  # the frozen text tower's weights come from the seed
  with pytest.raises(checkpoints.CheckpointError, match='text_encoder weights'):
    T.train(cfg, w)
  cfg.seed -= 1
  cfg.text_model.block_out_channels = (16, 16)
  with pytest.raises(checkpoints.CheckpointError, match=r'model\.json: unet differ'):
    T.train(cfg, w)
  del cfg['text_model']
  with pytest.raises(checkpoints.CheckpointError, match='text_model'):
    checkpoints.check_config_matches(w, cfg)
  assert load_target(w).step == 2  # the refusals left the target as it was


def test_caption_dropout_replaces_contexts_by_the_empty_captions():
  table = jnp.arange(4 * 3 * 2, dtype=jnp.float32).reshape(4, 3, 2)  # row 0: the empty caption
  rows = jnp.asarray(np.random.default_rng(0).integers(1, 4, 2000), jnp.int32)
  ctx, drop = TT.select_context(table, rows, jax.random.key(0), 0.1)
  assert 0.08 < float(drop.mean()) < 0.12
  np.testing.assert_array_equal(ctx[drop], np.broadcast_to(table[0], ctx[drop].shape))
  np.testing.assert_array_equal(ctx[~drop], table[rows[~drop]])
  assert not TT.select_context(table, rows, jax.random.key(0), 0.0)[1].any()
  assert TT.select_context(table, rows, jax.random.key(0), 1.0)[1].all()


def test_context_table_runs_each_distinct_caption_once():
  class Tok:
    def tokenize(self, texts):
      return np.asarray([[len(t)] for t in texts], np.int32)

  calls = []

  def text_fn(ids):
    calls.append(ids.shape)
    return np.repeat(ids[:, :, None], 2, axis=2).astype(np.float32)  # [n, 1, 2]

  captions = ['a cat', 'a dog!', 'a cat', '', 'a dog!']
  table, rows = TT.context_table(text_fn, Tok(), captions, chunk=2)
  assert calls == [(2, 1), (2, 1)]  # '', 'a cat', 'a dog!' padded to two chunks of 2
  np.testing.assert_array_equal(table[:, 0, 0], [0, 5, 6])
  np.testing.assert_array_equal(rows, [1, 2, 1, 0, 2])


def test_unsupported_text_model_fields_are_refused(text_cfg):
  text_cfg.text_model.vae = 'kl'
  with pytest.raises(TT.TextModelError, match=r'text_model\.vae'):
    TT.unet_config(text_cfg)
  text_cfg.text_model.vae = ''
  text_cfg.text_model.cross_attention = (True,)
  with pytest.raises(TT.TextModelError, match=r'text_model\.cross_attention'):
    TT.unet_config(text_cfg)
  text_cfg.text_model.cross_attention = (True, False)
  cfg = TT.unet_config(text_cfg)
  assert cfg.down_block_types == ('CrossAttnDownBlock2D', 'DownBlock2D')
  assert cfg.up_block_types == ('UpBlock2D', 'CrossAttnUpBlock2D')
  assert (cfg.in_channels, cfg.out_channels, cfg.cross_attention_dim) == (1, 1, 16)


def test_the_loss_runs_the_unet_under_the_selected_contexts(text_cfg):
  text_cfg.train.random_flip = False
  unet_cfg = TT.unet_config(text_cfg)
  unet, params = TT.unet_cond.CondUNet.create(unet_cfg, seed=0)
  schedule = TT.schedule_lib.make_schedule(text_cfg.diffusion)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
  table = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 16)), jnp.float32)
  rows, valid, key = jnp.array([1, 2, 1, 2]), jnp.ones(4, bool), jax.random.key(3)

  def loss(dropout, table):
    return float(
      TT.make_loss(unet, schedule, text_cfg.train, dropout)(params, images, rows, valid, table, key)
    )

  empty = jnp.broadcast_to(table[:1], table.shape)  # every caption the empty one
  assert loss(1.0, table) == pytest.approx(loss(0.0, empty), abs=1e-6)
  assert loss(0.0, table) != pytest.approx(loss(0.0, empty), abs=1e-6)
