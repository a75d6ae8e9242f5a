"""Captions as data: class templates, captions.jsonl, sidecar .txt files, COCO files, and errors."""

import json

import numpy as np
import pytest
from PIL import Image

from drc_jax.core import config_base
from drc_jax.data import captions as C
from drc_jax.data import sources as D


def _config(kind, **text):
  c = config_base.base_config()
  c.text.captions = kind
  for k, v in text.items():
    c.text[k] = v
  return c


def _folder(tmp_path, names):
  tmp_path.mkdir(parents=True, exist_ok=True)
  for n in names:
    (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), len(n) * 10, np.uint8)).save(tmp_path / n)
  return D.FolderSource(str(tmp_path), 8)


class _Labelled:
  name = 'labelled'
  label_names = ('Ankle boot', 'T-shirt/top')

  def __len__(self):
    return 4

  def read(self, indices):
    idx = np.asarray(indices)
    return np.zeros((len(idx), 8, 8, 1), np.uint8), idx % 2


def test_class_template_uses_lower_case_class_names():
  cap = C.make_captioner(_config('class_template'), D.CachedSource(_Labelled()))
  assert cap([0, 1, 2]) == ['a photo of a ankle boot', 'a photo of a t-shirt/top'] + [
    'a photo of a ankle boot'
  ]
  cap = C.make_captioner(_config('class_template', template='{} on white'), _Labelled())
  assert cap([1]) == ['t-shirt/top on white']


def test_class_template_needs_class_names_and_a_template(tmp_path):
  src = _folder(tmp_path, ['a.png'])
  with pytest.raises(D.DataError, match='has no class names'):
    C.make_captioner(_config('class_template'), src)
  with pytest.raises(D.DataError, match='config.text.template'):
    C.make_captioner(_config('class_template', template='{name}'), _Labelled())


def test_folder_captions_jsonl_and_sidecars(tmp_path):
  src = _folder(tmp_path, ['a.png', 'b.png', 'sub/c.png'])
  lines = [{'file': 'a.png', 'text': 'first'}, {'file': 'sub/c.png', 'caption': 'third'}]
  (tmp_path / 'captions.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
  (tmp_path / 'b.txt').write_text('  second \n')
  cap = C.make_captioner(_config('file'), src)
  assert cap([0, 1, 2]) == ['first', 'second', 'third']


def test_folder_missing_caption_names_the_image(tmp_path):
  src = _folder(tmp_path, ['a.png', 'b.png'])
  (tmp_path / 'a.txt').write_text('only a')
  cap = C.make_captioner(_config('file'), src)
  assert cap([0]) == ['only a']
  with pytest.raises(D.DataError, match=r'b\.png: no caption'):
    cap([1])


@pytest.mark.parametrize(
  'text, match',
  [
    ('{"file": "a.png"}\n', r'captions\.jsonl:1: expected'),
    ('not json\n', r'captions\.jsonl:1: not a JSON object'),
    ('{"file": "a.png", "text": "x"}\n{"file": "a.png", "text": "y"}\n', ':2: a second caption'),
    ('{"file": "zz.png", "text": "x"}\n', 'captions for 1 files not in'),
  ],
)
def test_bad_captions_file_is_named(tmp_path, text, match):
  src = _folder(tmp_path, ['a.png'])
  (tmp_path / 'captions.jsonl').write_text(text)
  with pytest.raises(D.DataError, match=match):
    C.make_captioner(_config('file'), src)


def test_coco_annotations(tmp_path):
  src = _folder(tmp_path / 'imgs', ['x.jpg', 'y.jpg'])
  coco = {
    'images': [{'id': 7, 'file_name': 'x.jpg'}, {'id': 9, 'file_name': 'y.jpg'}],
    'annotations': [
      {'image_id': 9, 'caption': 'a dog '},
      {'image_id': 7, 'caption': 'a cat'},
      {'image_id': 9, 'caption': 'another dog'},
    ],
  }
  path = tmp_path / 'captions_val2017.json'
  path.write_text(json.dumps(coco))
  cap = C.make_captioner(_config('file', captions_file=str(path)), src)
  assert cap([0, 1]) == ['a cat', 'a dog']


def test_indexed_captions_for_other_sources(tmp_path):
  path = tmp_path / 'caps.jsonl'
  path.write_text('{"index": 0, "text": "zero"}\n{"index": 3, "text": "three"}\n')
  cap = C.make_captioner(_config('file', captions_file=str(path)), _Labelled())
  assert cap([3, 0]) == ['three', 'zero']
  with pytest.raises(D.DataError, match='no caption for index 1'):
    cap([1])
  with pytest.raises(D.DataError, match='set config.text.captions_file'):
    C.make_captioner(_config('file'), _Labelled())
  path.write_text('{"index": 4, "text": "x"}\n')
  with pytest.raises(D.DataError, match='index 4 beyond the 4 images'):
    C.make_captioner(_config('file', captions_file=str(path)), _Labelled())


def test_folder_pair_each_with_its_own_captions(tmp_path):
  a = _folder(tmp_path / 'm', ['1.png', '2.png'])
  b = _folder(tmp_path / 'n', ['1.png'])
  (tmp_path / 'm' / 'captions.jsonl').write_text(
    '{"file": "1.png", "text": "m1"}\n{"file": "2.png", "text": "m2"}\n'
  )
  (tmp_path / 'n' / '1.txt').write_text('n1')
  cap = C.make_captioner(_config('file'), D.ConcatSource([a, b], 'pair'))
  assert cap([2, 0, 1]) == ['n1', 'm1', 'm2']


def test_sources_with_their_own_captions_come_first():
  class Samples(_Labelled):
    captions = ['', '', '', '']

  captions = C.Captions(_config('file'))  # a 'file' captioner would fail on this source
  assert captions(Samples(), [1, 3]) == ['', '']

  class Short(_Labelled):
    captions = ['only one']

  with pytest.raises(D.DataError, match='1 captions for 4 images'):
    captions(Short(), [0])
