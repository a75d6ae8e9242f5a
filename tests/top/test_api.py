"""The public Python API: the README's example runs as written, ``Auditor.score`` is exact and
batch-independent, its decisions are the shipped calibration's, and bad images are named."""

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
from PIL import Image

import drc_jax
from drc_jax import api
from drc_jax.core import config_base
from drc_jax.data import sources as data_lib
from drc_jax.targets import shipped

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_example() -> str:
  readme = open(os.path.join(REPO, 'README.md')).read()
  return re.search(r'```python\n(.*?)```', readme, re.S).group(1)


def test_the_readme_example_scores_two_images_with_every_attack():
  out = io.StringIO()
  with redirect_stdout(out):
    exec(compile(_readme_example(), 'README.md', 'exec'), {})  # pylint: disable=exec-used
  lines = out.getvalue().strip().splitlines()
  attacks = [line.split()[0] for line in lines]
  assert attacks == ['drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse'], out.getvalue()
  for line in lines:  # name, two scores, two decisions
    assert len(re.findall(r'-?\d+\.\d+(?:e[-+]\d+)?', line)) == 2, line
    assert len(re.findall(r'True|False', line)) == 2, line


@pytest.fixture(scope='module')
def auditor():
  return drc_jax.Auditor('shipped:fashion_mnist', attacks=['drc', 'loss', 'sima'])


def test_scores_do_not_depend_on_the_batch(auditor):
  images = auditor.split_images(members=2, nonmembers=1)
  together = auditor.score(images)
  alone = auditor.score(images[1:2])
  for a in auditor.attacks:
    np.testing.assert_array_equal(together.scores[a][1:2], alone.scores[a])
  assert together.evidence['restored'].shape == (3, 2, 16, 16, 1)  # K = 2 restorations
  np.testing.assert_array_equal(together.evidence['original'], images)
  assert together.image_sha256[1] == alone.image_sha256[0]


def test_decisions_are_the_shipped_calibration(auditor):
  directory = shipped.resolve('shipped:fashion_mnist')
  doc = json.loads(open(os.path.join(directory, shipped.THRESHOLDS_JSON)).read())
  result = auditor.score(auditor.split_images(members=3, nonmembers=3), fpr=0.1)
  for a in auditor.attacks:
    ref = np.asarray(doc['nonmember_scores'][a])
    s = result.scores[a]
    p = (1 + (ref[None, :] >= s[:, None]).sum(axis=1)) / (len(ref) + 1)
    np.testing.assert_allclose(result.p_values[a], p)
    np.testing.assert_array_equal(result.decisions[a], p <= 0.1)
    np.testing.assert_array_equal(result.decisions[a], s > result.thresholds[a])
  # the calibration non-members are not held-out images of the audit's split: all in split.json
  split = json.loads(open(os.path.join(directory, shipped.SPLIT_JSON)).read())
  assert set(doc['nonmember_index']) <= set(split['nonmembers'])


def test_paths_pil_images_and_arrays_are_one_image(auditor, tmp_path):
  raw = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
  Image.fromarray(raw).save(tmp_path / 'a.png')
  from_path = auditor.preprocess([str(tmp_path / 'a.png')])
  np.testing.assert_array_equal(from_path, auditor.preprocess(raw))
  np.testing.assert_array_equal(from_path, auditor.preprocess(Image.fromarray(raw)))
  np.testing.assert_array_equal(from_path, auditor.preprocess(raw[None, :, :, None]))
  assert from_path.shape == (1, 16, 16, 1) and from_path.dtype == np.float32


def test_bad_images_are_named(auditor, tmp_path):
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(data_lib.DataError, match='bad.png: unreadable or corrupt'):
    auditor.score([str(tmp_path / 'bad.png')])
  with pytest.raises(data_lib.DataError, match=r'images: float arrays must be prepared'):
    auditor.score(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(data_lib.DataError, match='channels'):
    auditor.score(np.zeros((28, 28, 3), np.uint8))
  with pytest.raises(drc_jax.UserError, match='fpr'):
    auditor.score(np.zeros((28, 28), np.uint8), fpr=1.5)


def test_attacks_without_calibration_scores_are_skipped_with_a_note(tmp_path):
  c = config_base.base_config()
  c.attacks.names = 'drc,loss,rediffuse'
  assert api._calibrated_names(c, tmp_path) == (False, [])  # no thresholds.json: none calibrated
  doc = {'nonmember_scores': {'drc': [0.1, 0.2], 'loss': [-1.0], 'sima': [0.0]}}
  (tmp_path / shipped.THRESHOLDS_JSON).write_text(json.dumps(doc))
  calibrated, notes = api._calibrated_names(c, tmp_path)
  assert calibrated and c.attacks.names == 'drc,loss'  # rediffuse left out, not an error
  assert len(notes) == 1 and notes[0].startswith('rediffuse: skipped') and 'thresholds' in notes[0]
  c.attacks.names = 'rediffuse'  # none of them calibrated: all run, scores without decisions
  calibrated, notes = api._calibrated_names(c, tmp_path)
  assert not calibrated and c.attacks.names == 'rediffuse' and 'no decisions' in notes[0]


def test_a_target_that_is_not_shipped_needs_its_config(tmp_path):
  with pytest.raises(drc_jax.UserError, match='config is required'):
    drc_jax.Auditor(str(tmp_path))


def test_the_package_api_is_small_and_lazy():
  code = 'import sys, drc_jax; print(sorted(m for m in sys.modules if m.startswith("drc_jax")))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['drc_jax']"  # nothing loaded until a name is used
  assert set(drc_jax.__all__) == {
    '__version__',
    'Auditor',
    'AuditResult',
    'load_target',
    'load_encoder',
    'ATTACKS',
    'UserError',
  }
  assert re.fullmatch(r'\d+\.\d+\.\d+', drc_jax.__version__)
