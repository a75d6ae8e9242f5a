"""Data layer: real Fashion-MNIST, tfds via mock_data, image folders, splits, batching, errors."""

import gzip
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from drc_jax import config_base
from drc_jax import data as D
from drc_jax import splits as S


def _data_cfg(**kw):
  c = config_base.base_config().data
  c.update(kw)
  return c


def test_fashion_mnist_real_images():
  src = D.FashionMnistSource('train')
  assert len(src) == 60000
  imgs, labels = src.read([0, 1, 59999])
  assert imgs.shape == (3, 28, 28, 1) and imgs.dtype == np.uint8
  assert labels.tolist() == [9, 0, 5]  # the first labels of Fashion-MNIST's training set
  x = D.preprocess(imgs, _data_cfg(resolution=16, channels=1), 'fm')
  assert x.shape == (3, 16, 16, 1) and x.min() >= -1 and x.max() <= 1
  assert len(D.FashionMnistSource('test')) == 10000


def test_fashion_mnist_errors_name_the_file(tmp_path):
  with pytest.raises(D.DataError, match='not found'):
    D.FashionMnistSource('train', str(tmp_path / 'nope'))
  with pytest.raises(D.DataError, match='train-images-idx3-ubyte.gz: file not found'):
    D.FashionMnistSource('train', str(tmp_path))
  bad = tmp_path / 'train-images-idx3-ubyte.gz'
  bad.write_bytes(b'not gzip at all')
  with pytest.raises(D.DataError, match='train-images-idx3-ubyte.gz: cannot read'):
    D.FashionMnistSource('train', str(tmp_path))
  with gzip.open(bad, 'wb') as f:  # header says 2 images of 28x28, body is truncated
    f.write(bytes.fromhex('00000803') + (2).to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2 + b'x')
  with pytest.raises(D.DataError, match='train-images-idx3-ubyte.gz: IDX body'):
    D.FashionMnistSource('train', str(tmp_path))
  with pytest.raises(D.DataError, match='split'):
    D.FashionMnistSource('validation')
  with pytest.raises(D.DataError, match='index 60000 out of range'):
    D.FashionMnistSource('train').read([5, 60000])


def test_channel_mismatch_is_an_error():
  imgs, _ = D.FashionMnistSource('train').read([0])
  with pytest.raises(D.DataError, match='1 channels but config.data.channels is 3'):
    D.preprocess(imgs, _data_cfg(channels=3), 'fm')
  x = D.preprocess(imgs, _data_cfg(channels=3, convert_channels=True, resolution=28), 'fm')
  assert x.shape == (1, 28, 28, 3)
  np.testing.assert_allclose(x[0, ..., 0], imgs[0, ..., 0] / 127.5 - 1, atol=1e-6)


def test_tfds_cifar10_and_celeba_through_data_source():
  with tfds.testing.mock_data(num_examples=6):
    src = D.make_source(_data_cfg(source='tfds', name='cifar10', channels=3, resolution=32))
    x, labels, hashes = D.load_images(src, [0, 5], _data_cfg(channels=3, resolution=32))
    assert x.shape == (2, 32, 32, 3) and labels.shape == (2,) and len(hashes[0]) == 64
    celeb_cfg = _data_cfg(source='tfds', name='celeb_a', channels=3, resolution=32,
                          center_crop=140)
    src = D.make_source(celeb_cfg)
    raw, labels = src.read([1])
    assert raw.shape == (1, 218, 178, 3) and labels.tolist() == [-1]
    x = D.preprocess(raw, celeb_cfg, 'celeb_a')
    assert x.shape == (1, 32, 32, 3)
    # Centre crop 140 then resize: equal to doing it by hand with PIL.
    crop = raw[0, 39:179, 19:159]
    want = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BICUBIC), np.float32)
    np.testing.assert_allclose(x[0], np.clip(want, 0, 255) / 127.5 - 1, atol=1e-6)


def test_tfds_missing_dataset_names_the_directory(tmp_path):
  with pytest.raises(D.DataError, match=str(tmp_path)):
    D.TfdsSource('cifar10', 'train', str(tmp_path))


def test_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ('a', 'b'):
    os.makedirs(tmp_path / cls)
    for i in range(2):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(tmp_path / cls / f'{i}.png')
  src = D.FolderSource(str(tmp_path), 16)
  raw, labels = src.read([0, 3])
  assert raw.shape == (2, 16, 16, 3) and labels.tolist() == [0, 1]
  (tmp_path / 'b' / '9.jpg').write_bytes(b'\xff\xd8garbage')
  src = D.FolderSource(str(tmp_path), 16)
  with pytest.raises(D.DataError, match='9.jpg: unreadable or corrupt'):
    src.read(range(len(src)))
  Image.fromarray(rng.integers(0, 255, (20, 24), np.uint8)).save(tmp_path / 'b' / '9.jpg')
  with pytest.raises(D.DataError, match='mixed grayscale and RGB'):
    D.FolderSource(str(tmp_path), 16).read(range(5))
  with pytest.raises(D.DataError, match='image folder not found'):
    D.FolderSource(str(tmp_path / 'missing'), 16)


def test_split_npz_and_json_round_trip(tmp_path):
  m = S.make_split('fashion_mnist/train', 100, 30, 20, seed=3)
  assert len(set(m.members) | set(m.nonmembers)) == 50
  S.save(m, str(tmp_path / 'split.npz'))
  z = np.load(tmp_path / 'split.npz')
  assert sorted(z.files) == ['mia_eval_idxs', 'mia_train_idxs']
  back = S.load(str(tmp_path / 'split.npz'))
  np.testing.assert_array_equal(back.members, m.members)
  np.testing.assert_array_equal(back.nonmembers, m.nonmembers)
  S.save(m, str(tmp_path / 'split.json'))
  back = S.load(str(tmp_path / 'split.json'))
  assert back.seed == 3 and back.dataset == 'fashion_mnist/train'
  assert json.loads((tmp_path / 'split.json').read_text())['num_members'] == 30


def test_split_errors(tmp_path):
  with pytest.raises(D.DataError, match='split file not found'):
    S.load(str(tmp_path / 'none.npz'))
  np.savez(tmp_path / 'bad.npz', train=np.arange(3))
  with pytest.raises(D.DataError, match="missing key 'mia_train_idxs'"):
    S.load(str(tmp_path / 'bad.npz'))
  with pytest.raises(D.DataError, match='both a member and a non-member'):
    S.SplitManifest('x', [1, 2], [2, 3])
  np.savez(tmp_path / 'oob.npz', mia_train_idxs=np.array([1, 70000]), mia_eval_idxs=np.array([2]))
  cfg = config_base.base_config().split
  cfg.file = str(tmp_path / 'oob.npz')
  with pytest.raises(D.DataError, match='members index 70000 out of range'):
    S.resolve(cfg, D.FashionMnistSource('train'), str(tmp_path / 'w'))


def test_resolve_writes_hashes_and_refuses_a_different_split(tmp_path):
  cfg = config_base.base_config().split
  cfg.num_members, cfg.num_nonmembers = 10, 5
  src = D.FashionMnistSource('train')
  m = S.resolve(cfg, src, str(tmp_path))
  assert len(m.members_sha256) == 64 and (tmp_path / 'split.json').exists()
  m2 = S.resolve(cfg, src, str(tmp_path))
  np.testing.assert_array_equal(m.members, m2.members)
  cfg.seed = 1
  with pytest.raises(D.DataError, match='differs from the config'):
    S.resolve(cfg, src, str(tmp_path))


@pytest.mark.parametrize('procs', [1, 2, 4])
def test_batch_slots_cover_every_position_once(procs):
  n, bs = 23, 8
  seen = []
  for p in range(procs):
    for slot in D.batch_slots(n, bs, p, procs):
      assert slot.positions.shape == (bs // procs,)
      seen += slot.positions[slot.valid].tolist()
      assert np.all(slot.positions[~slot.valid] == -1)
  assert sorted(seen) == list(range(n))
