"""Data layer: real Fashion-MNIST, tfds via mock_data, image folders, splits, batching, errors."""

import gzip
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from drc_jax.core import config_base
from drc_jax.data import sources as D
from drc_jax.data import splits as S


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
    celeb_cfg = _data_cfg(source='tfds', name='celeb_a', channels=3, resolution=32, center_crop=140)
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
  with pytest.raises(
    D.DataError,
    match=f'{tmp_path / "b" / "9.jpg"} is grayscale but {tmp_path / "a" / "0.png"} is RGB',
  ):
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


# ----------------------------------------------------------------------------------------------
# A folder of broken and unusual images: every file has a defined outcome.


def _png16(path, arr):
  """A 16-bit PNG written by hand (color type 0 = gray [H, W], 2 = RGB [H, W, 3])."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  h, w = arr.shape[:2]
  raw = b''.join(b'\x00' + arr[y].astype('>u2').tobytes() for y in range(h))

  def chunk(kind, data):
    return (
      struct.pack('>I', len(data))
      + kind
      + data
      + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  color = 0 if arr.ndim == 2 else 2
  path.write_bytes(
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color, 0, 0, 0))
    + chunk(b'IDAT', zlib.compress(raw))
    + chunk(b'IEND', b'')
  )


def test_fuzz_a_folder_of_broken_images(tmp_path):
  rng = np.random.default_rng(0)
  r = 16
  rgb = rng.integers(0, 256, (r, r, 3), np.uint8)
  gray16 = rng.integers(0, 65536, (r, r)).astype(np.uint16)
  gray16[0, :4] = [0, 65535, 257, 32767]
  rgb16 = rng.integers(0, 65536, (r, r, 3)).astype(np.uint16)
  good = tmp_path / 'good'
  good.mkdir()
  Image.fromarray(rgb).save(good / 'a_rgb.png')
  Image.fromarray(np.dstack([rgb, np.full((r, r), 7, np.uint8)])).save(good / 'b_rgba.png')
  Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE).save(good / 'c_palette.png')
  _png16(good / 'd_rgb16.png', rgb16)
  Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(good / 'e_bigger.png')
  Image.fromarray(rgb).save(good / 'f.jpg', quality=95)
  src = D.FolderSource(str(good), r)
  raw, labels = src.read(range(len(src)))
  assert raw.shape == (6, r, r, 3) and raw.dtype == np.uint8 and labels.tolist() == [-1] * 6
  np.testing.assert_array_equal(raw[0], rgb)
  np.testing.assert_array_equal(raw[1], rgb)  # RGBA: alpha dropped
  with Image.open(good / 'c_palette.png') as im:  # palette: expanded to its RGB colours
    np.testing.assert_array_equal(raw[2], np.asarray(im.convert('RGB')))
  np.testing.assert_array_equal(raw[3], (rgb16 >> 8).astype(np.uint8))  # 16-bit RGB: high byte

  gray = tmp_path / 'gray'
  gray.mkdir()
  _png16(gray / 'g16.png', gray16)
  Image.fromarray(rgb[..., 0]).convert('1').save(gray / 'h_bilevel.png')
  Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), 'LA').save(gray / 'i_la.png')
  raw, _ = D.FolderSource(str(gray), r).read(range(3))
  assert raw.shape == (3, r, r, 1)
  want = np.round(gray16 / 257.0).astype(np.uint8)  # 16-bit gray scaled, not clipped to 255
  np.testing.assert_array_equal(raw[0, ..., 0], want)
  assert raw[0, 0, :4, 0].tolist() == [0, 255, 1, 127]
  assert set(np.unique(raw[1])) <= {0, 255}
  np.testing.assert_array_equal(raw[2, ..., 0], rgb[..., 0])  # LA: alpha dropped

  broken = {
    'truncated.png': (good / 'a_rgb.png').read_bytes()[:200],
    'empty.png': b'',
    'text.png': b'hello, I am not an image\n',
    'bad.jpg': b'\xff\xd8\xff\xe0garbage',
  }
  for name, data in broken.items():
    d = tmp_path / name.replace('.', '_')
    d.mkdir()
    Image.fromarray(rgb).save(d / 'ok.png')
    (d / name).write_bytes(data)
    src = D.FolderSource(str(d), r)
    ok = src.files.index(str(d / 'ok.png'))
    assert src.read([ok])[0].shape == (1, r, r, 3)  # the good file still reads
    with pytest.raises(D.DataError, match=f'{d / name}: unreadable or corrupt image'):
      src.read(range(2))

  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  Image.fromarray(rgb).save(mixed / 'a.png')
  _png16(mixed / 'b16.png', gray16)
  with pytest.raises(
    D.DataError, match=f'{mixed / "b16.png"} is grayscale but {mixed / "a.png"} is RGB'
  ):
    D.FolderSource(str(mixed), r).read(range(2))

  (tmp_path / 'float').mkdir()
  Image.fromarray(np.zeros((r, r), np.float32), 'F').save(tmp_path / 'float' / 'f.tiff')
  (tmp_path / 'float' / 'f.tiff').rename(tmp_path / 'float' / 'f.png')  # a TIFF named .png
  with pytest.raises(D.DataError, match="f.png: image mode 'F'"):
    D.FolderSource(str(tmp_path / 'float'), r).read([0])


def test_folder_labels_are_named_by_their_folder(tmp_path):
  for cls in ('cat', 'dog'):
    (tmp_path / cls).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / '0.png')
  src = D.FolderSource(str(tmp_path), 8)
  _, labels = src.read([0, 1])
  assert [D.label_name(src, int(l)) for l in labels] == ['cat', 'dog']
  assert D.label_name(D.FashionMnistSource('train'), 9) == 'Ankle boot'
