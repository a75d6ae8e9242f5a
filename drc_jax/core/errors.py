"""The one base class of errors a user can fix: what they gave (config, data, split, checkpoint,
workdir) is wrong, and the message says what, where (file, field or index) and what to do.

``python -m drc_jax.main`` and ``python -m drc_jax.convert`` print a ``UserError`` as one line
and exit with status ``EXIT_USER_ERROR``; ``--verbose`` keeps the traceback. Any other exception
is a bug and keeps its traceback. Each module raises its own subclass (``validate.ConfigError``,
``data.DataError``, ``checkpoints.CheckpointError``, ``convert.ConversionError``, ...); they
also derive from ``ValueError``, as they did before this base existed.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags

EXIT_USER_ERROR = 2


class UserError(Exception):
  """An input the user can correct; the message names the file, field or index."""


class WorkdirError(UserError, ValueError):
  """A workdir that holds something else than this run expects (other scores, missing files)."""


class TrainingError(UserError, FloatingPointError):
  """Training diverged (a non-finite loss); the message names the step and what to try."""


def one_line(e: BaseException) -> str:
  """The message of ``e`` on one line (newlines and repeated blanks collapsed)."""
  return ' '.join(str(e).split())


def exit_with(message: str) -> NoReturn:
  """Prints ``error: message`` to stderr and exits with ``EXIT_USER_ERROR``."""
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def run_reporting_user_errors(fn: Callable[[], object], verbose: bool) -> object:
  """Runs ``fn``; a ``UserError`` becomes one line on stderr and exit status 2 unless ``verbose``.

  Other exceptions propagate with their traceback (they are bugs).
  """
  try:
    return fn()
  except UserError as e:
    if verbose:
      traceback.print_exc()
      sys.exit(EXIT_USER_ERROR)
    exit_with(f'{one_line(e)} (--verbose shows the traceback)')


def _flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for an error raised while parsing flags (a bad flag, config file or override)."""
  text = str(e)
  if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
    with contextlib.suppress(ValueError, SyntaxError):  # ml_collections repr-quotes KeyErrors
      text = ast.literal_eval(text)
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if any(ln.startswith('Traceback') for ln in lines):  # a config file raised: keep what and why
    lines = [lines[0], lines[-1]]
  message = ' '.join(' '.join(lines).split())
  if isinstance(e, (AttributeError, KeyError)) and lines:  # a --config.x.y override's unknown y
    field = lines[0].strip('\'"')
    flag = next(
      (
        a.split('=')[0]
        for a in argv
        if a.startswith('--config.') and field in a.split('=')[0].split('.')
      ),
      '--config',
    )
    hint = ' '.join(lines[1:])
    return f'{flag}: unknown config field {field!r}' + (f' ({hint})' if hint else '')
  return message


def flags_parser(argv: list[str]) -> list[str]:
  """``absl.app.run(..., flags_parser=)``: a bad flag, config file or override is one line.

  With ``--verbose`` among the arguments the original traceback is kept.
  """
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      getattr(flags.FLAGS.config, 'mode', None)  # ml_collections defers a file's load error
    return rest
  except Exception as e:  # pylint: disable=broad-except  (everything here comes from the argv)
    if '--verbose' in argv[1:]:
      raise
    exit_with(f'{_flag_error(e, argv)} (--verbose shows the traceback)')


HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def define_flags_reporting_errors(define: Callable[[], None], argv: list[str]) -> None:
  """Runs ``define`` (flag definitions): a default config loads there, with the command line's
  --config.x overrides, so a bad override is one line and exit status 2 (``--verbose``: the
  traceback)."""
  try:
    define()
  except Exception as e:  # pylint: disable=broad-except  (everything here comes from the argv)
    if '--verbose' in argv[1:]:
      raise
    exit_with(f'{_flag_error(e, argv)} (--verbose shows the traceback)')


def run_app(main: Callable[[list[str]], None], argv: list[str]) -> None:
  """``absl.app.run(main)`` with one-line flag errors; asking for help exits with status 0."""
  try:
    app.run(main, argv=argv, flags_parser=flags_parser)
  except SystemExit as e:
    if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
