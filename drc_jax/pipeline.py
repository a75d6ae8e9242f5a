"""One library function per mode of ``drc_jax.main``; tests drive runs through ``run``."""

from __future__ import annotations

import os

from absl import logging

from drc_jax import train as train_lib
from drc_jax import validate

MODES = ('train', 'audit', 'report', 'all')


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('runs', name)


def run(config, workdir: str, mode: str, overwrite: bool = False) -> None:
  """Runs ``mode`` ('train', 'audit', 'report' or 'all') of ``config`` in ``workdir``."""
  del overwrite  # used by the audit modes
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; expected one of {MODES}')
  validate.check(config)
  if mode in ('train', 'all'):
    done = train_lib.trained_steps(workdir)
    if done is not None and done >= config.train.steps:
      logging.info('target in %s already trained (%d steps): reusing it', workdir, done)
    else:
      train_lib.train(config, workdir)
