"""Two processes on 127.0.0.1 (gloo collectives, 2 CPU devices each) audit like one process."""

import os
import shutil
import socket
import stat
import subprocess
import sys

import numpy as np
from conftest import REPO, load_config

from drc_jax.audit import modes as pipeline
from drc_jax.audit import scoring as A
from drc_jax.audit import store

OVERRIDES = [
  '--config.split.num_members=24',
  '--config.split.num_nonmembers=24',
  '--config.audit.batch_size=8',
  '--config.audit.shard_size=16',
  '--config.attacks.names=drc,loss,pia',
]


def _config():
  c = load_config('fashion_mnist', 'runlocal')
  for o in OVERRIDES:
    key, value = o[len('--config.') :].split('=')
    section, field = key.split('.')
    c[section][field] = type(c[section][field])(value)
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_score_each_image_once_and_match_one_process(tmp_path):
  c = _config()
  target = tmp_path / 'target'
  pipeline.run(c, str(target), 'train')
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  shutil.copytree(target, single)
  shutil.copytree(target, multi)
  A.run_audit(c, str(single))

  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(
      os.environ,
      DRC_JAX_DISTRIBUTED='1',
      DRC_JAX_COORDINATOR=f'127.0.0.1:{port}',
      DRC_JAX_NUM_PROCESSES='2',
      DRC_JAX_PROCESS_ID=str(pid),
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
    )
    # Process 1 creates files readable by its owner only: any file it wrote would show it.
    umask = 0o022 if pid == 0 else 0o077
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          '-c',
          f'import os; os.umask({umask}); import runpy, sys; '
          f'sys.argv = ["drc_jax.main"] + sys.argv[1:]; runpy.run_module("drc_jax.main", '
          f'run_name="__main__")',
          '--config=configs/fashion_mnist.py:runlocal',
          f'--workdir={multi}',
          '--mode=audit',
          *OVERRIDES,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
      )
    )
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'process 0/2' in outs[0] and 'process 1/2' in outs[1] and '4 global devices' in outs[0]

  a, b = store.load_scores(str(single)), store.load_scores(str(multi))
  assert len(b['index']) == 48 and len(set(b['index'].tolist())) == 48  # each image once
  for k in a:
    if a[k].dtype.kind == 'f':
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_array_equal(b[k], a[k])
  for root, _, files in os.walk(multi):
    for f in files:
      mode = os.stat(os.path.join(root, f)).st_mode
      assert mode & stat.S_IRGRP, f'{f} was written by process 1'
