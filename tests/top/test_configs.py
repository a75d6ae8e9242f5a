"""Dataset configs: every file loads and validates, variants parse, runlocal runs end to end."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from conftest import REPO, load_config
from ml_collections import config_flags

from drc_jax.audit import modes as pipeline
from drc_jax.audit import store, validate
from drc_jax.data import sources as D

NAMES = sorted(
  os.path.splitext(f)[0]
  for f in os.listdir(os.path.join(REPO, 'configs'))
  if f.endswith('.py') and not f.startswith('_')
)
ATTACKS = ('drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse')


def _parse_flags(*args):
  """Parses command-line flags the way ``drc_jax.main`` does (config_flags, locked config)."""
  argv = ['prog', *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_the_dataset_configs_are_there():
  assert {'cifar10', 'cifar100', 'celeba', 'fashion_mnist'} <= set(NAMES)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('arg', [None, 'runlocal'])
def test_every_config_loads_and_validates(name, arg):
  c = load_config(name, arg)
  assert isinstance(c, ml_collections.ConfigDict)
  validate.check(c)
  if arg == 'runlocal':
    assert max(c.split.num_members, c.split.num_nonmembers) <= 32 and c.train.steps <= 100


@pytest.mark.parametrize(
  'name, members, order',
  [('cifar10', 25000, 'id'), ('cifar100', 25000, 'id'), ('celeba', 30000, '')],
)
def test_published_protocol(name, members, order):
  c = load_config(name)
  assert (c.data.source, c.data.split, c.data.resolution, c.data.channels) == (
    'tfds',
    'train',
    32,
    3,
  )
  assert c.data.tfds_order == order
  assert c.split.num_members == c.split.num_nonmembers == members
  assert (
    c.model.ch,
    tuple(c.model.ch_mult),
    c.model.num_res_blocks,
    tuple(c.model.attn_res),
    c.model.dropout,
  ) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
  assert (
    c.train.steps,
    c.train.batch_size,
    c.train.lr,
    c.train.warmup_steps,
    c.train.grad_clip,
    c.train.ema_decay,
    c.train.random_flip,
  ) == (800_000, 128, 2e-4, 5000, 1.0, 0.9999, True)
  assert (c.audit.batch_size, c.audit.shard_size) == (256, 2048)
  assert c.drc.restorer == 'ddim' and c.drc.mask_ratio == 0.5
  assert load_config(name, 'runlocal').data.tfds_order == ''  # mock data ids are random


@pytest.mark.parametrize('name', NAMES)
def test_unknown_variant_names_the_key(name):
  with pytest.raises(ValueError, match='runlcal'):
    load_config(name, 'runlcal')


def test_celeba_variants_combine():
  c = load_config('celeba')
  assert c.data.center_crop == 140 and c.data.name == 'celeb_a'
  c = load_config('celeba', 'res=64')
  assert c.data.resolution == 64 and tuple(c.model.attn_res) == (16,)
  validate.check(c)  # 16 is a level of the UNet at 64: 64, 32, 16, 8
  c = _parse_flags(f'--config={REPO}/configs/celeba.py:runlocal,res=64')
  assert c.data.resolution == 64 and c.split.num_members == 32
  validate.check(c)
  with pytest.raises(ValueError, match='res=48'):
    load_config('celeba', 'res=48')


def test_overrides_of_known_keys_work_and_unknown_keys_are_errors():
  c = _parse_flags(f'--config={REPO}/configs/cifar10.py', '--config.split.file=/x/split.npz')
  assert c.split.file == '/x/split.npz' and c.data.tfds_order == 'id'
  with pytest.raises(AttributeError, match='tfds_orde'):
    _parse_flags(f'--config={REPO}/configs/cifar10.py', '--config.data.tfds_orde=id')
  c = load_config('cifar10')
  c.lock()
  with pytest.raises(AttributeError, match='unknown'):
    c.data.unknown = 1


@pytest.mark.parametrize('name', ['cifar10', 'celeba'])
def test_runlocal_runs_end_to_end_on_mock_data(name, tmp_path):
  c = load_config(name, 'runlocal')
  with tfds.testing.mock_data(num_examples=64):  # the runlocal split takes 32 + 32
    metrics = pipeline.run(c, str(tmp_path), 'all')
  assert os.path.exists(tmp_path / 'report.html')
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  for name_ in ATTACKS:
    for m in (metrics, saved):
      assert 0.0 <= m[name_]['auc'] <= 1.0, (name_, m[name_])
  split = json.loads((tmp_path / 'split.json').read_text())
  assert split['dataset'] == f'{c.data.name}/train'


# ----------------------------------------------------------------------------------------------
# TfdsSource(order='id') on a data source whose ids we control.


class _FakeSource:
  """A list of tfds-like examples that counts reads (ids as str or bytes, as tfds may give)."""

  def __init__(self, ids):
    self.ids = ids
    self.reads = 0

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, r):
    self.reads += 1
    img = np.full((4, 4, 3), r, np.uint8)  # the image shows its record number
    return {'id': self.ids[r], 'image': img, 'label': r}


def _fake_tfds(monkeypatch, ids):
  src = _FakeSource(ids)
  monkeypatch.setattr(tfds, 'data_source', lambda *a, **k: src)
  return src


def test_tfds_order_id_maps_indices_to_original_order(monkeypatch):
  n = 50
  perm = np.random.default_rng(0).permutation(n)  # record r holds original image perm[r]
  fake = _fake_tfds(monkeypatch, [f'train_{p:05d}' for p in perm])
  cfg = load_config('cifar10').data  # tfds_order 'id' reaches the source through make_source
  src = D.make_source(cfg)
  assert src.order == 'id' and src.name == 'cifar10/train[order=id]' and len(src) == n
  assert fake.reads == 0  # the map is built on first read, not at construction
  raw, _ = src.read(range(n))
  records = raw[:, 0, 0, 0].astype(np.int64)
  np.testing.assert_array_equal(perm[records], np.arange(n))  # index i is original image i
  assert fake.reads == 2 * n  # one pass over the ids, then the n images read
  raw, _ = src.read([7, 3])
  np.testing.assert_array_equal(perm[raw[:, 0, 0, 0]], [7, 3])
  assert fake.reads == 2 * n + 2  # the map is cached
  # Record order, as before: index i is record i.
  plain = D.TfdsSource('cifar10', 'train')
  assert plain.name == 'cifar10/train'
  np.testing.assert_array_equal(plain.read([7, 3])[0][:, 0, 0, 0], [7, 3])
  # ids given as bytes parse the same.
  _fake_tfds(monkeypatch, [b'train_%05d' % p for p in perm])
  raw, _ = D.TfdsSource('cifar10', 'train', order='id').read([0, 49])
  np.testing.assert_array_equal(perm[raw[:, 0, 0, 0]], [0, 49])


@pytest.mark.parametrize(
  'ids, match',
  [
    (
      ['train_00000', 'train_00001', 'train_00001'],
      r'cifar10/train\[order=id\]: id number 1 '
      r'appears 2 times',
    ),
    (['train_00000', 'train_00001', 'train_00003'], 'record 2: id number 3 out of range'),
    (['train_00000', 'train_x', 'train_00002'], "record 1: id 'train_x' does not end in an int"),
  ],
)
def test_tfds_order_id_rejects_ids_that_are_not_a_permutation(monkeypatch, ids, match):
  _fake_tfds(monkeypatch, ids)
  src = D.TfdsSource('cifar10', 'train', order='id')
  with pytest.raises(D.DataError, match=match):
    src.read([0])


def test_tfds_order_errors(monkeypatch):
  with pytest.raises(D.DataError, match='config.data.tfds_order'):
    D.TfdsSource('cifar10', 'train', order='torchvision')
  with tfds.testing.mock_data(num_examples=4):  # celeb_a has no 'id' feature
    with pytest.raises(D.DataError, match="celeb_a/train.*no 'id' feature"):
      D.TfdsSource('celeb_a', 'train', order='id').read([0])


@pytest.mark.parametrize(
  'name, arg', [('cifar10', 'paper'), ('celeba', 'paper'), ('celeba', 'paper,mask=dino')]
)
def test_paper_protocol_needs_the_encoder_paths(name, arg):
  c = load_config(name, arg)
  field = 'saliency_encoder' if c.drc.mask == 'saliency_patches' else 'compare_encoder'
  with pytest.raises(validate.ConfigError, match=f'config.drc.{field} is empty'):
    validate.check(c)
  with c.unlocked():
    c.drc.saliency_encoder = c.drc.compare_encoder = '/nonexistent/encoder'
  with pytest.raises(validate.ConfigError, match='holds no encoder.json'):
    validate.check(c)


@pytest.mark.parametrize('name, arg', [('cifar10', 'paper,runlocal'), ('celeba', 'paper,runlocal')])
def test_paper_protocol_runs_end_to_end_with_random_encoders(name, arg, tmp_path):
  """DINO-attention or face masks and CLIP / face-ID cosine, through the whole audit."""
  if name == 'celeba':
    pytest.importorskip('facenet_pytorch', reason='the MTCNN weights ship in facenet-pytorch')
  c = load_config(name, arg)
  with c.unlocked():
    c.attacks.names = 'drc,loss'
  with tfds.testing.mock_data(num_examples=64):
    metrics = pipeline.run(c, str(tmp_path), 'all')
  assert 0.0 <= metrics['drc']['auc'] <= 1.0
  table = store.load_scores(str(tmp_path))
  sims = table['drc/sim']
  assert sims.shape == (64, 2) and np.all(np.abs(sims) <= 1.0 + 1e-5)  # cosines
  assert len(np.unique(sims)) > 10  # the encoder sees the restorations: similarities vary
  if c.drc.mask == 'face':
    assert 'drc/face_found' in table  # random mock images: the centre box stands in
  recorded = json.loads((tmp_path / store.AUDIT_CONFIG).read_text())
  assert set(recorded['target']['encoders_sha256']) >= {'compare'}
