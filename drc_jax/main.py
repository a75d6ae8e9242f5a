"""drc_jax entry point: parses flags, logs the devices, calls one library function per mode.

python -m drc_jax.main --help_config                     # every config field and its meaning

python -m drc_jax.main                                   # the embedded default, whole job
python -m drc_jax.main --config=configs/cifar10.py --workdir=gs://bucket/run --mode=audit
python -m drc_jax.main --config=configs/celeba.py:runlocal --config.audit.batch_size=32
python -m drc_jax.main --mode=dataset --config.dataset.suspect_dir=my_photos   # a set: p-value
"""

from __future__ import annotations

import logging as py_logging
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from drc_jax.audit import modes as pipeline
from drc_jax.core import config_base, errors, parallel


class _ShortFormat(py_logging.Formatter):
  """'HH:MM:SS message' (warnings and errors name their level)."""

  def __init__(self):
    super().__init__('%(asctime)s %(message)s', '%H:%M:%S')

  def format(self, record) -> str:
    text = super().format(record)
    if record.levelno >= py_logging.WARNING:
      head, _, rest = text.partition(' ')
      text = f'{head} {record.levelname.lower()}: {rest}'
    return text


def _define_flags() -> None:
  """The flags, defined when the program starts (importing this module defines none); the
  default config is loaded here, with any --config.x overrides of the command line."""
  config_flags.DEFINE_config_file(
    'config', config_base.DEFAULT_CONFIG, 'Config file (path[:variant]).', lock_config=True
  )
  flags.DEFINE_string(
    'workdir',
    None,
    'Run directory (local or gs://); default '
    'runs/<config>[-<variant>]_<source>_<dataset> (see README).',
  )
  flags.DEFINE_enum('mode', None, pipeline.MODES, 'What to run (default: config.mode).')
  flags.DEFINE_bool(
    'overwrite',
    False,
    'Audit a workdir made with a different config or target '
    'anyway: once every input is validated, its results move to W/superseded/.',
  )
  flags.DEFINE_bool(
    'verbose',
    False,
    'Show the traceback of errors in the inputs (config, data, '
    'split, checkpoint, workdir) instead of one line.',
  )
  flags.DEFINE_bool(
    'help_config', False, 'Print every config field with its value and meaning, then exit.'
  )
  flags.DEFINE_string(
    'compilation_cache',
    parallel.default_cache_dir(),
    "Directory of compiled programs reused by later runs ('' = off; DRC_JAX_CACHE_DIR sets "
    'the default).',
  )


class _QuietLibraries:
  """Drops INFO records of orbax (a dozen lines per checkpoint) and JAX's report of backends it
  probed and did not find ("Unable to initialize backend 'tpu'" on every CPU run); warnings
  still pass."""

  def filter(self, record) -> bool:
    if record.levelno > 20:
      return True
    if '/orbax/' in record.pathname:
      return False
    return not (
      'xla_bridge' in record.pathname and str(record.msg).startswith('Unable to initialize backend')
    )


def main(argv):
  if len(argv) > 1:
    errors.exit_with(
      f'unexpected arguments {argv[1:]}: every option is a --flag (python -m drc_jax.main --help)'
    )
  if flags.FLAGS.help_config:
    print(config_base.describe(flags.FLAGS.config))
    return
  parallel.set_cpu_defaults()
  parallel.enable_compilation_cache(flags.FLAGS.compilation_cache)
  handler = logging.get_absl_handler()
  handler.addFilter(_QuietLibraries())
  if not flags.FLAGS.verbose:  # time and message; --verbose keeps absl's full prefix
    handler.setFormatter(_ShortFormat())
  parallel.initialize()
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or pipeline.default_workdir(
    config_flags.get_config_filename(flags.FLAGS['config']), config
  )
  logging.info(
    'JAX %s, process %d/%d, %d local / %d global devices (%s)',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  if jax.default_backend() == 'cpu' and parallel.host_allocator() == 'default':
    logging.debug(
      "malloc: the system's; a train step runs about 1.3x faster on tcmalloc "
      '(launch/local.sh preloads it; launch/tcmalloc.sh)'
    )
  errors.run_reporting_user_errors(
    lambda: pipeline.run(
      config, workdir, flags.FLAGS.mode or config.mode, overwrite=flags.FLAGS.overwrite
    ),
    flags.FLAGS.verbose,
  )


def run(argv: list[str] | None = None) -> None:
  """``python -m drc_jax.main`` and the console script ``drc-audit``."""
  argv = list(sys.argv if argv is None else argv)
  errors.define_flags_reporting_errors(_define_flags, argv)
  errors.run_app(main, argv)


if __name__ == '__main__':
  run()
