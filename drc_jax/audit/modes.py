"""One library function per mode of ``drc_jax.main``; tests drive runs through ``run``."""

from __future__ import annotations

import contextlib
import json
import os
import re

from absl import logging
from etils import epath

from drc_jax.audit import dataset_inference as dataset_lib
from drc_jax.audit import results as results_lib
from drc_jax.audit import samples as samples_lib
from drc_jax.audit import scoring as audit_lib
from drc_jax.audit import store, summary, validate
from drc_jax.core import errors, fileio, parallel
from drc_jax.targets import checkpoints
from drc_jax.targets import train as train_lib

MODES = ('train', 'audit', 'report', 'dataset', 'all')


def default_workdir(config_path: str, config=None) -> str:
  """``runs/<config>[-<variant>]_<source>_<dataset>``, each word once.

  The config file's name (with its variant, e.g. ``celeba-runlocal,res=64`` as
  ``celeba-runlocal-res-64``), then the data source and the dataset (a folder source: the
  folder's name), leaving out a word already there: ``runs/fashion_mnist`` for the embedded
  default, ``runs/cifar10_tfds``, ``runs/celeba_tfds_celeb_a``,
  ``runs/fashion_mnist_folder_digits`` for ``--config.data.source=folder
  --config.data.data_dir=.../digits``, ``runs/fashion_mnist_folders_mine_others`` for
  ``--config.split.members_dir=.../mine --config.split.nonmembers_dir=.../others``. So a run on
  other data never lands on a workdir made for this one (and a workdir's target is checked
  against its training data anyway).
  """
  path, _, variant = config_path.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  words, seen = [stem], {stem}
  if variant:
    words[0] += '-' + re.sub(r'[^A-Za-z0-9_.]+', '-', variant).strip('-')
  if config is not None:
    d, s = config.data, config.split
    dataset = os.path.basename(os.path.normpath(d.data_dir)) if d.source == 'folder' else d.name
    data_words = (d.source, dataset)
    if s.get('members_dir', ''):  # a split of two folders: their names
      data_words = ('folders',) + tuple(
        os.path.basename(os.path.normpath(s[f])) for f in ('members_dir', 'nonmembers_dir')
      )
    for word in data_words:
      word = re.sub(r'[^A-Za-z0-9_.-]+', '-', str(word)).strip('-.')
      if word and word not in seen:
        words.append(word)
        seen.add(word)
  return os.path.join('runs', '_'.join(words))


def _refuse_training_audited_target(workdir: str, steps: int, overwrite: bool) -> None:
  """Training on a target whose scores are in the workdir would leave them describing weights
  that no longer exist: refused unless ``overwrite`` (the next audit then moves them aside)."""
  recorded = store.recorded_fingerprint(workdir)
  if recorded is None or overwrite:
    return
  if (recorded.get('audit') or {}).get('checkpoint'):
    return  # those scores are of a target elsewhere (config.audit.checkpoint)
  step = (
    (recorded.get('target') or {}).get('step') if isinstance(recorded.get('target'), dict) else None
  )
  raise store.AuditConfigMismatch(
    f'{workdir} holds results of its target at step {step if step is not None else "?"}; '
    f'training it to step {steps} would leave them describing weights that no longer exist. '
    f'Use another --workdir, or pass --overwrite to train and re-audit (the old results then '
    f'move to {workdir}/{store.SUPERSEDED_DIR}/).'
  )


def run(config, workdir: str, mode: str, overwrite: bool = False) -> dict | None:
  """Runs ``mode`` ('train', 'audit', 'report', 'dataset' or 'all') of ``config`` in ``workdir``.

  'all' trains the target when the workdir holds none (or an unfinished one) unless
  ``config.audit.checkpoint`` names a target or the workdir holds an imported one
  (``python -m drc_jax.convert``), then audits and writes the report. 'dataset' tests a suspect
  set against known non-members (``config.dataset``; scoring what the audit has not) on a target
  already there. Returns the metrics of the audit modes, the suspect set's result of
  'dataset'.
  """
  if mode not in MODES:
    raise validate.ConfigError(f'--mode: unknown {mode!r}; expected one of {MODES}')
  validate.check(config)
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise errors.WorkdirError(f'{workdir}: not a directory (--workdir names a run directory)')
  # One run per workdir at a time: a second is refused (naming the first), so two runs never
  # mix their scores. Process 0 holds it for a multi-host run (the others write nothing).
  lock = fileio.workdir_lock(workdir, errors.WorkdirError) if parallel.is_writer() else None
  with lock or contextlib.nullcontext():
    return _run(config, workdir, mode, overwrite)


def _run(config, workdir: str, mode: str, overwrite: bool) -> dict | None:
  if mode == 'report':  # a redraw from the workdir alone: the config plays no part
    logging.info(
      'redrawing the report of %s from its saved results (nothing is recomputed)', workdir
    )
    return _print_results(workdir, results_lib.redraw(workdir))
  imported = checkpoints.is_imported(workdir)
  if not config.audit.checkpoint or mode == 'train':
    checkpoints.check_config_matches(workdir, config)
  if mode == 'train' and imported:
    raise checkpoints.CheckpointError(
      f'{workdir} holds an imported target; it is audited, not '
      f'trained (use --mode=audit, or another --workdir)'
    )
  if mode == 'train' or (mode == 'all' and not config.audit.checkpoint and not imported):
    done = train_lib.trained_steps(workdir)
    if done is not None and done >= config.train.steps:
      logging.info(
        'target in %s already trained (%d steps): reusing it (its training data is '
        'checked by the audit)',
        workdir,
        done,
      )
    else:
      _refuse_training_audited_target(workdir, config.train.steps, overwrite)
      train_lib.train(config, workdir)
  if mode == 'train':
    return None
  if mode == 'dataset':
    result = dataset_lib.run(config, workdir, overwrite=overwrite)
    if parallel.is_writer():
      print(dataset_lib.format_summary(result))
      print(f'report: {os.path.abspath(os.path.join(workdir, "report.html"))}')
    return result
  metrics = audit_lib.run_audit(config, workdir, overwrite=overwrite)
  return _print_results(workdir, metrics)


def _print_results(workdir: str, metrics: dict) -> dict:
  """The metrics table, the sample check and where the report is, on the terminal."""
  if parallel.is_writer():
    print(summary.format_metrics_table(metrics))
    for line in summary.verdict(metrics):
      print(f'verdict: {line}')
    samples_json = epath.Path(workdir) / 'samples.json'
    if samples_json.exists():
      figures = json.loads(samples_json.read_text())
      print(samples_lib.format_line(figures))
      for warning in figures.get('warnings', ()):
        print(f'WARNING: {warning}')
    print(f'report: {os.path.abspath(os.path.join(workdir, "report.html"))}')
  return metrics
