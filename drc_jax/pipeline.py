"""One library function per mode of ``drc_jax.main``; tests drive runs through ``run``."""

from __future__ import annotations

import os

from absl import logging

from drc_jax import audit as audit_lib
from drc_jax import checkpoints
from drc_jax import parallel
from drc_jax import report as report_lib
from drc_jax import train as train_lib
from drc_jax import validate

MODES = ('train', 'audit', 'report', 'all')


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('runs', name)


def run(config, workdir: str, mode: str, overwrite: bool = False) -> dict | None:
  """Runs ``mode`` ('train', 'audit', 'report' or 'all') of ``config`` in ``workdir``.

  'all' trains the target when the workdir holds none (or an unfinished one) unless
  ``config.audit.checkpoint`` names a target or the workdir holds an imported one
  (``python -m drc_jax.convert``), then audits and writes the report. Returns the
  metrics of the audit modes.
  """
  if mode not in MODES:
    raise validate.ConfigError(f'--mode: unknown {mode!r}; expected one of {MODES}')
  validate.check(config)
  imported = checkpoints.is_imported(workdir)
  if mode == 'train' and imported:
    raise checkpoints.CheckpointError(f'{workdir} holds an imported target; it is audited, not '
                                      f'trained (use --mode=audit, or another --workdir)')
  if mode == 'train' or (mode == 'all' and not config.audit.checkpoint and not imported):
    done = train_lib.trained_steps(workdir)
    if done is not None and done >= config.train.steps:
      logging.info('target in %s already trained (%d steps): reusing it', workdir, done)
    else:
      train_lib.train(config, workdir)
  if mode == 'train':
    return None
  if mode == 'report':
    metrics = audit_lib.write_results(config, workdir)
  else:
    metrics = audit_lib.run_audit(config, workdir, overwrite=overwrite)
  if parallel.is_writer():
    print(report_lib.format_metrics_table(metrics))
    print(f'report: {os.path.abspath(os.path.join(workdir, "report.html"))}')
  return metrics
