"""Checkpoint integrity: the SHA-256 recorded at save time is verified at load time."""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints
from drc_jax.targets import train as T
from drc_jax.targets.load import load_target


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir with two checkpoint steps (1 and 2, different EMA weights) and no training."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top

  cfg = load_config('fashion_mnist', 'runlocal')
  wd = tmp_path_factory.mktemp('ckpt')
  unet, _, params, _, tx = T.build(cfg)
  checkpoints.save_model_json(str(wd), unet, dict(cfg.diffusion))
  state = T.init_state(params, tx)
  mngr = checkpoints.manager(str(wd))
  checkpoints.save_state(mngr, 1, state)
  state = dict(
    state,
    step=state['step'] + 1,
    ema_params=jax.tree_util.tree_map(lambda p: p + 0.01, state['ema_params']),
  )
  checkpoints.save_state(mngr, 2, state)
  mngr.wait_until_finished()
  mngr.close()
  return wd


def _abstract_state(workdir):
  from conftest import load_config  # pylint: disable=g-import-not-at-top

  _, _, params, _, tx = T.build(load_config('fashion_mnist', 'runlocal'))
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, T.init_state(params, tx))


def test_hashes_are_recorded_and_verified(workdir):
  target = load_target(str(workdir))
  assert target.step == 2
  recorded = checkpoints._recorded(workdir / 'checkpoints' / '2')
  assert recorded['ema_params'] == checkpoints.tree_sha256(target.params)
  assert set(recorded) == {'ema_params', 'state'}
  one = load_target(str(workdir / 'checkpoints' / '1'))
  assert checkpoints.tree_sha256(one.params) != recorded['ema_params']


def test_data_that_differs_from_its_hash_is_refused(workdir, tmp_path):
  """Step 1's metadata over step 2's data (valid orbax files): only the hash can tell."""
  wd = tmp_path / 'w'
  shutil.copytree(workdir, wd)
  shutil.rmtree(wd / 'checkpoints' / '1' / 'default')
  shutil.copytree(wd / 'checkpoints' / '2' / 'default', wd / 'checkpoints' / '1' / 'default')
  step_dir = wd / 'checkpoints' / '1'
  with pytest.raises(
    checkpoints.CheckpointError,
    match=f'{step_dir}: the EMA weights read back differ from those saved',
  ):
    load_target(str(step_dir))
  mngr = checkpoints.manager(str(wd))
  with pytest.raises(
    checkpoints.CheckpointError, match=f'{step_dir}: the training state read back differ'
  ):
    checkpoints.restore(mngr, _abstract_state(wd), step=1)
  mngr.close()


def test_flipped_bits_never_load_silently(workdir, tmp_path):
  """One flipped bit per copy, in each data file of the checkpoint: an error naming the
  checkpoint, or the very same weights (the bit was not in the EMA weights)."""
  ref = model_lib.flat_params(load_target(str(workdir)).params)
  data_dir = workdir / 'checkpoints' / '2' / 'default' / 'ocdbt.process_0' / 'd'
  files = [f for f in sorted(data_dir.iterdir()) if f.stat().st_size > 10_000]  # array data
  errors, n = 0, 0
  for f in files:
    for frac in (0.25, 0.5, 0.75):
      wd = tmp_path / f'w{n}'
      n += 1
      shutil.copytree(workdir, wd)
      copy = wd / os.path.relpath(f, workdir)
      data = bytearray(copy.read_bytes())
      data[int(len(data) * frac)] ^= 0x10
      copy.write_bytes(bytes(data))
      try:
        got = model_lib.flat_params(load_target(str(wd)).params)
      except checkpoints.CheckpointError as e:
        assert str(e).startswith(f'{wd / "checkpoints" / "2"}: ') and '\n' not in str(e)
        errors += 1
      else:
        for k in ref:
          np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
      shutil.rmtree(wd)
  assert errors >= 1, f'no flip among {n} reached the EMA weights'


def test_an_unreadable_chunk_is_one_error_naming_the_checkpoint(workdir, tmp_path):
  wd = tmp_path / 'w'
  shutil.copytree(workdir, wd)
  data_dir = wd / 'checkpoints' / '2' / 'default' / 'ocdbt.process_0' / 'd'
  for f in data_dir.iterdir():
    with open(f, 'r+b') as fh:
      fh.truncate(100)
  with pytest.raises(
    checkpoints.CheckpointError, match=f'{wd / "checkpoints" / "2"}: unreadable checkpoint'
  ):
    load_target(str(wd))
  mngr = checkpoints.manager(str(wd))
  with pytest.raises(checkpoints.CheckpointError, match=f'{wd / "checkpoints" / "2"}: '):
    checkpoints.restore(mngr, _abstract_state(wd))
  mngr.close()


def test_loading_is_quiet(workdir, caplog):
  """No orbax '_CHECKPOINT_METADATA does not exist' nor 'Sharding info not provided' per load."""
  import gc  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top

  # Orbax read tasks an earlier test left failing (a deliberately damaged checkpoint) report
  # 'Task exception was never retrieved' when garbage-collected: collect them before listening.
  gc.collect()
  with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    load_target(str(workdir))
    load_target(str(workdir / 'checkpoints' / '1'))
    mngr = checkpoints.manager(str(workdir))
    checkpoints.restore(mngr, _abstract_state(workdir))
    mngr.close()
  noise = [
    r.getMessage()
    for r in caplog.records
    if r.levelno >= logging.WARNING
    # an earlier test's leftover task, finalized now: not this load's output
    and not (r.name == 'asyncio' and str(workdir) not in r.getMessage())
  ]
  noise += [str(w.message) for w in caught if 'Sharding info' in str(w.message)]
  assert not noise, noise


def test_the_cli_log_filter_drops_the_backend_probe():
  import logging  # pylint: disable=g-import-not-at-top

  from drc_jax import main  # pylint: disable=g-import-not-at-top

  quiet = main._QuietLibraries()
  probe = logging.LogRecord(
    'jax._src.xla_bridge',
    logging.INFO,
    '/x/jax/_src/xla_bridge.py',
    1,
    "Unable to initialize backend '%s': %s",
    ('tpu', 'no libtpu'),
    None,
  )
  assert not quiet.filter(probe)
  own = logging.LogRecord(
    'absl', logging.INFO, '/x/drc_jax/audit/scoring.py', 1, 'scored shard', (), None
  )
  warning = logging.LogRecord(
    'orbax', logging.WARNING, '/x/orbax/checkpoint/x.py', 1, 'w', (), None
  )
  assert quiet.filter(own) and quiet.filter(warning)
