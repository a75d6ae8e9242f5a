"""The wheel stands alone: built from the checkout, unpacked elsewhere and run from an empty
directory, it audits the shipped target with its own configs and data files."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp('wheel')
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '-q',
      '--no-deps',
      '--no-build-isolation',
      '-w',
      out,
      REPO,
    ],
    check=True,
    capture_output=True,
  )
  (path,) = out.glob('drc_jax-*.whl')
  return path


def test_the_wheel_carries_configs_targets_and_the_console_script(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  for want in (
    'drc_jax/configs/fashion_mnist.py',
    'drc_jax/configs/_cifar.py',
    'drc_jax/targets/fashion_mnist/ema.safetensors',
    'drc_jax/targets/fashion_mnist/thresholds.json',
    'drc_jax/analysis/__main__.py',
  ):
    assert want in names, want
  assert not any(n.startswith(('tests/', 'configs/', 'launch/')) for n in names)
  (entry,) = [n for n in names if n.endswith('entry_points.txt')]
  assert 'drc-audit = drc_jax.main:run' in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_unpacked_wheel_audits_from_an_empty_directory(wheel, tmp_path):
  site = tmp_path / 'site'
  zipfile.ZipFile(wheel).extractall(site)
  empty = tmp_path / 'empty'
  empty.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), DRC_JAX_XLA_DEFAULTS='0')
  env.pop('XLA_FLAGS', None)
  code = 'import drc_jax, sys; print(drc_jax.__file__, drc_jax.__version__)'
  where = subprocess.run(
    [sys.executable, '-c', code], cwd=empty, env=env, capture_output=True, text=True, check=True
  )
  assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not the checkout's
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'drc_jax.main',
      '--mode=audit',
      '--config.audit.max_images=8',
      '--config.audit.num_samples=0',
      '--config.audit.batch_size=8',
      '--config.audit.bootstrap=20',
      '--config.attacks.names=loss,sima',
      f'--workdir={tmp_path / "W"}',
      f'--compilation_cache={tmp_path / "cache"}',
    ],
    cwd=empty,
    env=env,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((tmp_path / 'W' / 'metrics.json').read_text())
  assert {'loss', 'sima'} <= set(metrics)
  assert not os.listdir(empty)  # nothing written where it ran
  assert os.listdir(tmp_path / 'cache')  # the compiled programs, for the next run
