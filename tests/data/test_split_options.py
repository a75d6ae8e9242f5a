"""Splits of two image folders (members_dir / nonmembers_dir) and class-shifted splits."""

import json
import os

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from drc_jax.audit import modes as pipeline
from drc_jax.audit import validate
from drc_jax.core import config_base
from drc_jax.data import sources as D
from drc_jax.data import splits as S
from drc_jax.targets import checkpoints

N_MEMBERS, N_NONMEMBERS = 14, 10


def _write_pngs(folder, images, names=None) -> None:
  os.makedirs(folder, exist_ok=True)
  for i, im in enumerate(images):
    name = names[i] if names else f'{i:03d}.png'
    Image.fromarray(im[..., 0]).save(os.path.join(folder, name))


@pytest.fixture(scope='module')
def fmnist_images():
  """24 real Fashion-MNIST training images (28x28x1) and their labels."""
  return D.FashionMnistSource('train').read(np.arange(N_MEMBERS + N_NONMEMBERS))


@pytest.fixture
def folders(tmp_path, fmnist_images):
  """A members folder (14 images, some in a subfolder) and a non-members folder (10 images)."""
  raw, _ = fmnist_images
  members, nonmembers = str(tmp_path / 'mine'), str(tmp_path / 'others')
  _write_pngs(members, raw[:8])
  _write_pngs(os.path.join(members, 'more'), raw[8:N_MEMBERS])
  _write_pngs(nonmembers, raw[N_MEMBERS:])
  return members, nonmembers


def _folder_config(members: str, nonmembers: str, resolution: int = 16):
  c = load_config('fashion_mnist', 'runlocal')
  c.data.resolution = resolution
  c.split.members_dir, c.split.nonmembers_dir = members, nonmembers
  return c


# ----------------------------------------------------------------------------------------------
# Two folders.


def test_two_folders_are_the_source_and_the_split(folders, fmnist_images, tmp_path):
  members, nonmembers = folders
  raw, _ = fmnist_images
  c = _folder_config(members, nonmembers, resolution=28)  # 28: the files' pixels, unresized
  source = S.run_source(c)
  assert len(source) == N_MEMBERS + N_NONMEMBERS
  got, labels = source.read(np.arange(len(source)))
  np.testing.assert_array_equal(got, raw)  # members first, each folder in sorted file order
  # Labels are subfolders: 'more' holds members 8..13; files at a folder's top have none.
  assert source.label_names == ('more',)
  assert labels.tolist() == [-1] * 8 + [0] * 6 + [-1] * N_NONMEMBERS

  wd = str(tmp_path / 'w')
  os.makedirs(wd)
  split = S.resolve(c.split, D.CachedSource(source), wd)
  assert split.members.tolist() == list(range(N_MEMBERS))
  assert split.nonmembers.tolist() == list(range(N_MEMBERS, N_MEMBERS + N_NONMEMBERS))
  saved = json.loads(open(os.path.join(wd, 'split.json')).read())
  assert saved['dataset'] == (
    f'folders:members={os.path.abspath(members)}|nonmembers={os.path.abspath(nonmembers)}'
  )
  assert (saved['num_members'], saved['num_nonmembers']) == (N_MEMBERS, N_NONMEMBERS)
  assert saved['members_sha256'] and saved['nonmembers_sha256']
  # The same folders resume; the fields a drawn split uses do not apply.
  c.split.num_members, c.split.seed = 999, 7
  again = S.resolve(c.split, S.run_source(c), wd)
  assert again.members_sha256 == split.members_sha256

  # A non-member file changed (same count): refused by its image hashes.
  _write_pngs(nonmembers, raw[:1], names=['000.png'])
  with pytest.raises(D.DataError, match='the nonmembers images changed'):
    S.resolve(c.split, S.run_source(c), wd)
  # A member added: refused by the counts.
  _write_pngs(members, raw[:1], names=['zzz.png'])
  with pytest.raises(D.DataError, match='differs from the config .* the folders changed since'):
    S.resolve(c.split, S.run_source(c), wd)


@pytest.mark.parametrize(
  'fields, match',
  [
    ({'nonmembers_dir': ''}, 'members_dir and config.split.nonmembers_dir: give both'),
    ({'members_dir': ''}, 'members_dir and config.split.nonmembers_dir: give both'),
    ({'file': '/x/split.npz'}, 'config.split.file and config.split.members_dir'),
    ({'member_range': '0:5', 'nonmember_range': '5:9'}, 'config.split.member_range and'),
    (
      {'member_classes': '0', 'nonmember_classes': '1'},
      'config.split.member_classes and config.split.members_dir',
    ),
  ],
)
def test_folder_fields_that_contradict_are_refused(folders, fields, match):
  c = _folder_config(*folders)
  c.split.update(fields)
  with pytest.raises(validate.ConfigError, match=match):
    validate.check(c)
  with pytest.raises(D.DataError, match=match):
    S.run_source(c)


def test_an_empty_missing_or_overlapping_folder_is_named(folders, tmp_path):
  members, nonmembers = folders
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  (empty / 'notes.txt').write_text('no images here')
  c = _folder_config(members, str(empty))
  with pytest.raises(
    D.DataError, match=f'{empty}: no .png/.jpg/.jpeg files found .config.split.nonmembers_dir.'
  ):
    S.run_source(c)
  c = _folder_config(str(tmp_path / 'missing'), nonmembers)
  with pytest.raises(validate.ConfigError, match='members_dir: .*missing is not a dir'):
    validate.check(c)
  for pair in ((members, members), (members, os.path.join(members, 'more'))):
    with pytest.raises(D.DataError, match='nonmembers_dir: .* overlap .an image'):
      S.run_source(_folder_config(*pair))


def test_folders_of_two_kinds_are_refused_naming_both_files(folders, tmp_path):
  members, _ = folders
  rgb = tmp_path / 'rgb'
  rgb.mkdir()
  Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(rgb / 'a.png')
  source = S.run_source(_folder_config(members, str(rgb)))
  with pytest.raises(D.DataError, match=f'{rgb / "a.png"} is RGB but .*000.png is grayscale'):
    source.read(np.arange(len(source)))


def test_audit_of_two_folders_end_to_end(folders, tmp_path):
  """--mode=all trains the tiny target on the members folder and audits both folders."""
  members, nonmembers = folders
  c = _folder_config(members, nonmembers)
  c.attacks.names = 'drc,loss'
  wd = str(tmp_path / 'w')
  metrics = pipeline.run(c, wd, 'all')
  saved = json.loads(open(os.path.join(wd, 'metrics.json')).read())
  for name in ('drc', 'loss', 'blind'):
    for m in (metrics, saved):
      assert m[name]['all_images']['n_members'] == N_MEMBERS, name
      assert m[name]['all_images']['n_nonmembers'] == N_NONMEMBERS, name
  trained_on = checkpoints.trained_on(wd)
  assert trained_on['source'] == 'folders' and trained_on['num_members'] == N_MEMBERS
  assert trained_on['members_dir'] == os.path.abspath(members)
  assert trained_on['dataset'] == json.loads(open(os.path.join(wd, 'split.json')).read())['dataset']
  assert pipeline.default_workdir('configs/fashion_mnist.py', c) == (
    'runs/fashion_mnist_folders_mine_others'
  )
  # Rerun with the same folders: resumes (target reused, shards kept); changed members: refused.
  pipeline.run(c, wd, 'all')
  _write_pngs(os.path.join(members, 'more'), np.zeros((1, 28, 28, 1), np.uint8), ['000.png'])
  with pytest.raises(D.DataError, match='the members images changed'):
    pipeline.run(c, wd, 'all')


# ----------------------------------------------------------------------------------------------
# Splits by class.


@pytest.fixture(scope='module')
def fmnist_labels():
  return S._labels(D.FashionMnistSource('train'))


def test_make_split_by_class(fmnist_labels):
  labels = fmnist_labels
  m = S.make_split('fm', len(labels), 300, 500, 3, '', '', '4,0,1,2,3', '5,6,7,8,9', labels)
  assert set(labels[m.members].tolist()) <= {0, 1, 2, 3, 4}
  assert set(labels[m.nonmembers].tolist()) <= {5, 6, 7, 8, 9}
  assert len(m.members) == 300 and len(m.nonmembers) == 500
  assert len(set(labels[m.members].tolist())) == 5  # drawn across the classes, not from one
  assert m.classes == '0,1,2,3,4|5,6,7,8,9'
  again = S.make_split('fm', len(labels), 300, 500, 3, '', '', '0,1,2,3,4', '5,6,7,8,9', labels)
  np.testing.assert_array_equal(again.members, m.members)  # seeded
  # With ranges too: both apply.
  r = S.make_split('fm', len(labels), 20, 20, 0, '0:1000', '1000:2000', '0', '1', labels)
  assert r.members.max() < 1000 and r.nonmembers.min() >= 1000
  assert set(labels[r.members].tolist()) == {0} and set(labels[r.nonmembers].tolist()) == {1}
  # No classes: the split is the plain seeded permutation, as before.
  plain = S.make_split('fm', len(labels), 30, 20, 3)
  perm = np.random.default_rng(3).permutation(len(labels))
  np.testing.assert_array_equal(plain.members, np.sort(perm[:30]))
  assert plain.classes == '' and 'classes' not in plain.to_json()


@pytest.mark.parametrize(
  'mc, nc, n, match',
  [
    ('0,1', '1,2', 10, 'member_classes and nonmember_classes share label 1'),
    ('0,10', '2', 10, 'config.split.member_classes: no image of fm has label 10'),
    ('0', '', 10, 'give both member_classes and nonmember_classes'),
    ('0', '1', 7000, 'config.split.num_members: 7000 exceeds the 6000 images of fm with labels 0'),
    ('0', 'x', 10, "config.split.nonmember_classes: 'x' is not a comma list"),
  ],
)
def test_class_split_errors_name_the_field(fmnist_labels, mc, nc, n, match):
  with pytest.raises(D.DataError, match=match):
    S.make_split('fm', len(fmnist_labels), n, 10, 0, '', '', mc, nc, fmnist_labels)


def test_class_split_needs_labels():
  with pytest.raises(D.DataError, match='member_classes: unlabelled has no labels'):
    S.make_split('unlabelled', 20, 2, 2, 0, '', '', '0', '1', np.full(20, -1))


def test_class_split_is_recorded_and_checked_on_resume(tmp_path):
  c = load_config('fashion_mnist', 'runlocal,shifted')
  source = D.CachedSource(S.run_source(c))
  split = S.resolve(c.split, source, str(tmp_path))
  _, labels = source.read(split.members)
  assert set(labels.tolist()) <= {0, 1, 2, 3, 4}
  assert set(source.read(split.nonmembers)[1].tolist()) <= {5, 6, 7, 8, 9}
  saved = json.loads((tmp_path / 'split.json').read_text())
  assert saved['classes'] == '0,1,2,3,4|5,6,7,8,9'
  c.split.member_classes = '4,3,2,1,0'  # the same classes: resumes
  assert S.resolve(c.split, source, str(tmp_path)).members.tolist() == split.members.tolist()
  c.split.member_classes, c.split.nonmember_classes = '0,1,2,3', '5,6,7,8,9,4'
  with pytest.raises(D.DataError, match='differs from the config'):
    S.resolve(c.split, source, str(tmp_path))
  c.split.member_classes = c.split.nonmember_classes = ''  # a random split: refused too
  with pytest.raises(D.DataError, match='differs from the config'):
    S.resolve(c.split, source, str(tmp_path))


def test_shifted_variant():
  c = load_config('fashion_mnist', 'runlocal,shifted')
  assert (c.split.member_classes, c.split.nonmember_classes) == ('0,1,2,3,4', '5,6,7,8,9')
  assert c.audit.checkpoint == '' and c.split.num_members == 32 and c.train.steps == 20
  validate.check(c)
  full = load_config('fashion_mnist', 'shifted')
  assert full.audit.checkpoint == '' and full.split.num_members == 256
  assert (full.split.member_classes, full.model.ch) == ('0,1,2,3,4', 32)
  plain = load_config('fashion_mnist')
  assert plain.split.member_classes == '' and plain.audit.checkpoint == 'shipped:fashion_mnist'
  bad = load_config('fashion_mnist', 'runlocal')
  bad.split.member_classes, bad.split.nonmember_classes = '0,1', '1'
  with pytest.raises(validate.ConfigError, match='label 1 is in both'):
    validate.check(bad)
  described = config_base.describe(c)
  assert "--config.split.member_classes='0,1,2,3,4'  # comma lists of label ids" in described
  assert "--config.split.members_dir=''  # image folders of the members" in described
