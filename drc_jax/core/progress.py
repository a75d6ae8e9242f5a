"""Progress of long loops, and a line before each program compiles.

``Progress`` reports a loop of ``total`` items: on a terminal (stderr a tty) a tqdm bar, in a log
a plain line at least every ``LOG_INTERVAL_S`` seconds of work and a last one when it closes::

  scoring: 128/1256 images, 41 s, about 5 min left

Its rate and time left leave out the first update (``Throughput``): the first batch (or train
step) of a run includes XLA compilation, often far longer than the work (an audit's first line
once said 590 s for 10 s of work).

``compiling(what, batch)`` logs, before a program's first call, that the next seconds compile it
and whether the compilation cache keeps it for later runs; ``announce_compiles(fn, ...)`` wraps a
jitted function to do so before its first call with each new batch shape.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import tqdm
from absl import logging

from drc_jax.core import parallel

LOG_INTERVAL_S = 10.0  # at least one line per this many seconds of work in a log


class Throughput:
  """Items per second after the first update, and the time left for ``total`` items."""

  def __init__(self, total: int):
    self.total = total
    self.done = 0
    self._start: tuple[float, int] | None = None  # (time, items done) after the first update
    self._last = 0.0

  def update(self, n: int, now: float | None = None) -> None:
    """Counts ``n`` more items finished at ``now`` (default: the monotonic clock)."""
    now = time.monotonic() if now is None else now
    self.done += n
    self._last = now
    if self._start is None:
      self._start = (now, self.done)

  def rate(self) -> float | None:
    """Items per second since the first update; None before a second one."""
    if self._start is None or self.done == self._start[1] or self._last <= self._start[0]:
      return None
    return (self.done - self._start[1]) / (self._last - self._start[0])

  def seconds_left(self) -> float | None:
    """The time the items not done yet take at ``rate()``; None while it is unknown."""
    rate = self.rate()
    return None if rate is None else max(self.total - self.done, 0) / rate


def duration(seconds: float, rounded: bool = False) -> str:
  """'41 s', '5 min 3 s', '2 h 7 min'; ``rounded``: to the minute from a minute on ('5 min')."""
  s = max(int(round(seconds)), 0)
  if s < 60:
    return f'{s} s'
  if rounded:
    s = int(round(s / 60)) * 60
  h, rest = divmod(s, 3600)
  m, sec = divmod(rest, 60)
  if h:
    return f'{h} h {m} min'
  return f'{m} min' if rounded or not sec else f'{m} min {sec} s'


def _log(line: str) -> None:
  """Logs ``line`` (INFO), clearing a progress bar on the terminal around it."""
  with tqdm.tqdm.external_write_mode(file=sys.stderr):
    logging.info('%s', line)


class Progress:
  """The progress of ``total`` items of a long loop; ``update(n)`` after each ``n`` done.

  On a terminal: a tqdm bar on stderr. Otherwise (a log): ``write`` (default: an INFO log line)
  gets a line at the first update after ``interval`` seconds without one, and one when it closes
  (unless nothing was done or the last line already said as much). A context manager: leaving
  it closes.

  Args:
    what: what the loop does ('scoring', 'training').
    total: the items it will do.
    unit: their name, plural ('images', 'steps').
    terminal: a bar (True) or lines (False); default: whether stderr is a tty.
    write: where lines go (default: ``logging.info``).
    interval: the longest silence of a log, in seconds of work.
    clock: seconds, monotonic (tests give a fake one).
  """

  def __init__(
    self,
    what: str,
    total: int,
    unit: str,
    *,
    terminal: bool | None = None,
    write: Callable[[str], None] | None = None,
    interval: float = LOG_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.what, self.total, self.unit = what, int(total), unit
    self.speed = Throughput(self.total)
    self._write = write or (lambda line: logging.info('%s', line))
    self._interval, self._clock = interval, clock
    self._start = self._last_line = clock()
    self._last_done: int | None = None  # items done at the last line
    self._bar = None
    if self.total > 0 and (sys.stderr.isatty() if terminal is None else terminal):
      self._bar = tqdm.tqdm(
        total=self.total,
        desc=what,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}{postfix}',
      )

  @property
  def done(self) -> int:
    return self.speed.done

  def timing(self, now: float | None = None) -> str:
    """'41 s, about 5 min left': the time since the start, and what is known of the rest."""
    now = self._clock() if now is None else now
    elapsed = duration(now - self._start)
    if self.done >= self.total:
      rate = self.speed.rate()
      return f'{elapsed}, {rate:.3g} {self.unit}/s' if rate else elapsed
    left = self.speed.seconds_left()
    if left is None:
      if not self.done:
        return elapsed
      return f'{elapsed} (the first update included compiling; time left from the next)'
    return f'{elapsed}, about {duration(left, rounded=True)} left'

  def line(self, now: float | None = None) -> str:
    """'scoring: 128/1256 images, 41 s, about 5 min left'."""
    return f'{self.what}: {self.done}/{self.total} {self.unit}, {self.timing(now)}'

  def update(self, n: int) -> None:
    """Counts ``n`` more items done, now."""
    now = self._clock()
    self.speed.update(int(n), now)
    if self._bar is not None:
      self._bar.set_postfix_str(self.timing(now), refresh=False)
      self._bar.update(int(n))
    elif now - self._last_line >= self._interval:
      self._line(now)

  def log(self, msg: str, *args) -> None:
    """Logs ``msg % args`` (INFO) without breaking the bar."""
    _log(msg % args if args else msg)

  def _line(self, now: float) -> None:
    self._write(self.line(now))
    self._last_line, self._last_done = now, self.done

  def close(self) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(self.timing(), refresh=False)
      self._bar.close()
      self._bar = None
    elif self.done and self._last_done != self.done:
      self._line(self._clock())

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def compiling(what: str, batch: int | None = None) -> str:
  """Logs (and returns) that the ``what`` program compiles now, for ``batch`` images, and where
  the compilation cache keeps it: one line before a jitted program's first call, so the silence
  that follows is explained. 'compiling the scorer for batch 64 (once per configuration; cached
  in ~/.cache/drc_jax/jax for later runs)'."""
  cache = parallel.compilation_cache_dir()
  kept = f'cached in {cache} for later runs' if cache else 'no compilation cache: each run compiles'
  line = f'compiling the {what}' + ('' if batch is None else f' for batch {batch}')
  line += f' (once per configuration; {kept})'
  _log(line)
  return line


class Announced:
  """A jitted function that logs ``compiling(what, batch)`` before its first call and before each
  call whose array arguments (the top-level ones: a batch, its keys) change shape or dtype, as
  they make it compile again: one line per compiled program, none per call. Trees of arrays
  (params, a train state: fixed for a program) are not compared: flattening one at each call
  would cost a millisecond. Attributes other than calling (``lower``, ...) are ``fn``'s."""

  def __init__(self, fn: Callable, what: str, batch_arg: int | None = None):
    self.fn, self.what, self.batch_arg = fn, what, batch_arg
    self._seen: set = set()

  def __call__(self, *args, **kwargs) -> Any:
    named = [*enumerate(args), *sorted(kwargs.items())]
    key = tuple((k, x.shape, x.dtype) for k, x in named if hasattr(x, 'shape'))
    if key not in self._seen:
      self._seen.add(key)
      given = self.batch_arg is not None and self.batch_arg < len(args)
      shape = getattr(args[self.batch_arg], 'shape', ()) if given else ()
      compiling(self.what, int(shape[0]) if shape else None)
    return self.fn(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name == 'fn':  # not set yet (copying, unpickling)
      raise AttributeError(name)
    return getattr(self.fn, name)


def announce_compiles(fn: Callable, what: str, batch_arg: int | None = None) -> Announced:
  """``fn`` (jitted), announcing each compilation with ``compiling(what, batch)``; ``batch`` is the
  leading size of positional argument ``batch_arg`` (None: no batch in the line)."""
  return Announced(fn, what, batch_arg)
