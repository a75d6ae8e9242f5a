"""Programs kept in their jax.export form: the same numbers, loaded instead of lowered again."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.core import export_cache, parallel


def _fn():
  def f(params, batch):
    h = jnp.tanh(batch['x'] @ params['w']) + params['b'][0]
    return {'score': h.sum(axis=1), 'first': h[:, 0]}

  mesh = parallel.make_mesh()
  return mesh, jax.jit(f, **parallel.shardings(mesh, 'rd', 'd'))


def _args(mesh, n=16):
  rng = np.random.default_rng(0)
  # integer keys, as an NNX list's state has them: the export is made of the flat leaves
  params = parallel.replicate(
    mesh, {'w': rng.normal(size=(5, 3)).astype(np.float32), 'b': {0: np.float32(0.5)}}
  )
  batch = {'x': parallel.shard_batch(mesh, rng.normal(size=(n, 5)).astype(np.float32))}
  return params, batch


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, 'compilation_cache_dir', lambda: str(tmp_path))
  return tmp_path / 'exported'


def test_a_repeat_run_loads_the_program_and_computes_the_same(cache, monkeypatch):
  mesh, f = _fn()
  args = _args(mesh)
  want = jax.device_get(f(*args))
  first = export_cache.Exported(f, 'test program', key='k1')
  got = jax.device_get(first(*args))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  (saved,) = list(cache.iterdir())
  assert saved.name.endswith(export_cache.SUFFIX)
  # a new run (a new wrapper): the saved program is loaded, nothing is traced or lowered again
  monkeypatch.setattr(jax.export, 'export', lambda *a, **k: pytest.fail('exported again'))
  again = export_cache.Exported(f, 'test program', key='k1')
  got = jax.device_get(again(*args))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_another_key_or_shape_is_another_program(cache):
  mesh, f = _fn()
  export_cache.Exported(f, 'p', key='k1')(*_args(mesh))
  export_cache.Exported(f, 'p', key='k2')(*_args(mesh))
  export_cache.Exported(f, 'p', key='k1')(*_args(mesh, n=24))
  assert len(list(cache.iterdir())) == 3


def test_a_damaged_program_is_lowered_again(cache):
  mesh, f = _fn()
  args = _args(mesh)
  export_cache.Exported(f, 'p', key='k1')(*args)
  (saved,) = list(cache.iterdir())
  saved.write_bytes(b'not a program')
  got = jax.device_get(export_cache.Exported(f, 'p', key='k1')(*args))
  np.testing.assert_array_equal(got['score'], jax.device_get(f(*args))['score'])
  assert saved.read_bytes() != b'not a program'


def test_without_a_cache_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, 'compilation_cache_dir', lambda: '')
  mesh, f = _fn()
  args = _args(mesh)
  got = jax.device_get(export_cache.Exported(f, 'p', key='k')(*args))
  np.testing.assert_array_equal(got['first'], jax.device_get(f(*args))['first'])
  assert not os.listdir(tmp_path)


def test_the_digest_covers_the_package_source():
  assert len(export_cache.package_source_sha256()) == 64
  mesh, _ = _fn()
  args = _args(mesh)
  assert export_cache.digest('k', args) == export_cache.digest('k', args)
  assert export_cache.digest('k', args) != export_cache.digest('k2', args)


def test_one_wrapper_keeps_a_program_per_batch_shape(cache):
  mesh, f = _fn()
  prog = export_cache.Exported(f, 'p', key='k1')
  for n in (16, 24, 16):
    args = _args(mesh, n=n)
    got = jax.device_get(prog(*args))
    np.testing.assert_array_equal(got['score'], jax.device_get(f(*args))['score'])
  assert len(list(cache.iterdir())) == 2
