"""Errors a user can read: input errors are one line and exit status 2; bugs keep tracebacks."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from drc_jax import convert
from drc_jax.audit import store, validate
from drc_jax.core import errors
from drc_jax.data import sources as data
from drc_jax.targets import checkpoints


def _run(module, *args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=cwd or REPO,
    timeout=300,
  )


def _error_lines(r):
  return [ln for ln in r.stderr.splitlines() if ln.startswith('error: ')]


def test_every_input_error_is_a_user_error():
  for cls in (
    validate.ConfigError,
    data.DataError,
    checkpoints.CheckpointError,
    convert.ConversionError,
    store.AuditConfigMismatch,
    errors.WorkdirError,
    errors.TrainingError,
  ):
    assert issubclass(cls, errors.UserError), cls


@pytest.mark.parametrize(
  'args, expected',
  [
    (['--config.drc.mask_ratio=1.5'], 'error: config.drc.mask_ratio: 1.5 not in (0, 1)'),
    (
      ['--config.data.tfds_orde=id'],
      'error: --config.data.tfds_orde: unknown config field '
      '\'tfds_orde\' (Did you mean "tfds_order"',
    ),
    (['--config.train.steps=abc'], 'error: flag --config.train.steps=abc: invalid literal'),
  ],
)
def test_main_prints_one_line_and_exits_2(tmp_path, args, expected):
  r = _run(
    'drc_jax.main',
    f'--config={REPO}/configs/fashion_mnist.py:runlocal',
    f'--workdir={tmp_path / "w"}',
    *args,
  )
  assert r.returncode == errors.EXIT_USER_ERROR, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  lines = _error_lines(r)
  assert len(lines) == 1 and lines[0].startswith(expected), r.stderr[-2000:]
  assert not (tmp_path / 'w').exists()  # nothing was started


@pytest.mark.parametrize(
  'args, expected',
  [
    (
      ['--config.audit.max_image=5'],
      "error: --config.audit.max_image: unknown config field 'max_image' (Did you mean "
      '"max_images"',
    ),
    (['--config.drc.foo=1'], "error: --config.drc.foo: unknown config field 'foo'"),
    (['--config.foo.bar=1'], "error: --config.foo.bar: unknown config field 'foo'"),
    (['extra'], "error: unexpected arguments ['extra']: every option is a --flag"),
  ],
)
def test_the_default_config_and_stray_arguments_are_one_line(tmp_path, args, expected):
  """No --config: the default config loads when the flags are defined, overrides included."""
  r = _run('drc_jax.main', f'--workdir={tmp_path / "w"}', *args, cwd=tmp_path)
  assert r.returncode == errors.EXIT_USER_ERROR and 'Traceback' not in r.stderr, r.stderr[-2000:]
  lines = _error_lines(r)
  assert len(lines) == 1 and lines[0].startswith(expected), r.stderr[-2000:]
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('module', [['drc_jax.main'], ['drc_jax.analysis', 'bench']])
def test_help_exits_0(module):
  r = _run(*module, '--help')
  assert r.returncode == 0 and '--config' in r.stdout, r.stderr[-2000:]


def test_help_config_lists_every_field_with_its_meaning():
  r = _run('drc_jax.main', '--help_config')
  assert r.returncode == 0, r.stderr[-2000:]
  fields = [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]
  assert '--config.audit.max_images=0' in fields and '--config.drc.mask_ratio=0.25' in fields
  assert all('  # ' in ln for ln in r.stdout.splitlines() if ln.strip()), r.stdout
  assert len(fields) >= 85  # every field of the base config


def test_a_config_file_error_is_one_line(tmp_path):
  r = _run('drc_jax.main', f'--config={REPO}/configs/celeba.py:res=48', f'--workdir={tmp_path}')
  assert r.returncode == errors.EXIT_USER_ERROR and 'Traceback' not in r.stderr
  assert 'config argument res=48: expected 32 or 64' in _error_lines(r)[0]


def test_verbose_keeps_the_traceback(tmp_path):
  r = _run(
    'drc_jax.main',
    f'--config={REPO}/configs/fashion_mnist.py:runlocal',
    f'--workdir={tmp_path / "w"}',
    '--config.drc.mask_ratio=1.5',
    '--verbose',
  )
  assert r.returncode == errors.EXIT_USER_ERROR
  assert 'Traceback' in r.stderr and 'ConfigError: config.drc.mask_ratio' in r.stderr


def test_convert_prints_one_line(tmp_path):
  r = _run(
    'drc_jax.convert',
    '--format=diffusers',
    f'--src={tmp_path / "missing"}',
    f'--workdir={tmp_path / "w"}',
  )
  assert r.returncode == errors.EXIT_USER_ERROR and 'Traceback' not in r.stderr
  assert _error_lines(r) == [
    f'error: {tmp_path / "missing"}: not found (--verbose shows the traceback)'
  ]


@pytest.mark.parametrize(
  'args, expected',
  [
    (['--fresh_after=96'], "error: --fresh_after='96': expected M,N (two integers)"),
    (
      ['--fresh_after=96,96', '--frontier_run={missing}'],
      'error: {missing}/frontier.json: not found',
    ),
  ],
)
def test_frontier_rereading_errors_are_one_line(tmp_path, args, expected):
  missing = str(tmp_path / 'no-run')
  r = _run(
    'drc_jax.analysis',
    'frontier',
    f'--config={REPO}/configs/fashion_mnist.py',
    f'--out={tmp_path / "out"}',
    *[a.format(missing=missing) for a in args],
  )
  assert r.returncode == errors.EXIT_USER_ERROR and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert _error_lines(r)[0].startswith(expected.format(missing=missing)), r.stderr[-2000:]


def test_programming_errors_keep_their_traceback():
  def bug():
    raise RuntimeError('a bug')

  with pytest.raises(RuntimeError, match='a bug'):
    errors.run_reporting_user_errors(bug, verbose=False)

  def user_error():
    raise validate.ConfigError('config.x: bad')

  with pytest.raises(SystemExit) as e:
    errors.run_reporting_user_errors(user_error, verbose=False)
  assert e.value.code == errors.EXIT_USER_ERROR


def test_pyproject_license_is_an_spdx_expression():
  """The license table ({text = ...}) made setuptools print BuildBackendWarnings on each build."""
  import tomllib  # pylint: disable=g-import-not-at-top

  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  assert project['project']['license'] == 'Apache-2.0'
  (req,) = [r for r in project['build-system']['requires'] if r.startswith('setuptools')]
  assert req == 'setuptools>=77'  # the first setuptools that reads SPDX license expressions


def test_logs_are_time_and_message_unless_verbose(tmp_path):
  (tmp_path / 'file').write_text('x')  # a workdir that is a file: refused after the first lines
  quiet = _run('drc_jax.main', f'--workdir={tmp_path / "file"}', cwd=tmp_path)
  assert quiet.returncode == errors.EXIT_USER_ERROR, quiet.stderr[-2000:]
  assert re.search(r'^\d\d:\d\d:\d\d JAX \S+, process 0/1', quiet.stderr, re.M), quiet.stderr
  assert not re.search(r'^I\d{4} ', quiet.stderr, re.M) and 'malloc' not in quiet.stderr
  assert _error_lines(quiet) == [
    f'error: {tmp_path / "file"}: not a directory (--workdir names a '
    'run directory) (--verbose shows the traceback)'
  ]
  verbose = _run('drc_jax.main', f'--workdir={tmp_path / "file"}', '--verbose', cwd=tmp_path)
  assert re.search(r'^I\d{4} [\d:.]+ +\d+ main.py:\d+\] JAX ', verbose.stderr, re.M)
