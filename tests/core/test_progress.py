"""Progress: rate and time left leave out the first update (compilation); a log gets a line at
least every 10 s of work, a terminal a tqdm bar; one line before each compilation."""

import io
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.core import parallel, progress


class FakeClock:
  def __init__(self, t: float = 0.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


def test_the_first_update_is_left_out():
  speed = progress.Throughput(total=100)
  speed.update(10, now=590.0)  # the first batch: 590 s, nearly all of it compilation
  assert speed.rate() is None and speed.seconds_left() is None
  speed.update(10, now=592.0)  # 10 images in 2 s
  assert speed.rate() == 5.0 and speed.seconds_left() == 16.0  # 80 left at 5 per second
  speed.update(80, now=608.0)
  assert speed.rate() == 5.0 and speed.seconds_left() == 0.0


def test_durations():
  assert progress.duration(41.4) == '41 s'
  assert progress.duration(303) == '5 min 3 s'
  assert progress.duration(300) == '5 min'
  assert progress.duration(303, rounded=True) == '5 min'
  assert progress.duration(331, rounded=True) == '6 min'
  assert progress.duration(2 * 3600 + 7 * 60 + 20) == '2 h 7 min'


def test_a_log_gets_a_readable_line_at_least_every_10_seconds_of_work():
  clock, lines = FakeClock(), []
  bar = progress.Progress(
    'scoring', 1256, 'images', terminal=False, write=lines.append, clock=clock
  )
  times = []  # when each line was written
  clock.t = 60.0  # the first batch compiles for a minute
  bar.update(64)
  assert lines == [
    'scoring: 64/1256 images, 1 min (the first update included compiling; time left from the next)'
  ]
  times.append(clock.t)
  for _ in range(18):  # then a batch of 64 every 3 s: 21.3 images/s
    clock.t += 3.0
    n = len(lines)
    bar.update(64)
    if len(lines) > n:
      times.append(clock.t)
  # a line at the first update 10 s after the last: every 12 s here, never sooner than 10 s
  assert np.diff(times).tolist() == [12.0] * 4
  assert lines[1] == 'scoring: 320/1256 images, 1 min 12 s, about 44 s left'  # 936 at 21.3/s
  bar.close()
  assert lines[-1] == 'scoring: 1216/1256 images, 1 min 54 s, about 2 s left'
  # A steady stream of updates: exactly one line per 10 s.
  clock, lines = FakeClock(), []
  with progress.Progress(
    'training', 1000, 'steps', terminal=False, write=lines.append, clock=clock
  ) as p:
    for _ in range(1000):
      clock.t += 0.1
      p.update(1)
  assert len(lines) == 10 and lines[-1] == 'training: 1000/1000 steps, 1 min 40 s, 10 steps/s'


def test_no_line_before_10_seconds_and_the_last_line_once():
  clock, lines = FakeClock(), []
  with progress.Progress('x', 4, 'images', terminal=False, write=lines.append, clock=clock) as p:
    for _ in range(4):
      clock.t += 2.0
      p.update(1)
    assert lines == []  # 8 s of work
  assert lines == ['x: 4/4 images, 8 s, 0.5 images/s']
  lines.clear()
  with progress.Progress('x', 4, 'images', terminal=False, write=lines.append, clock=clock):
    pass
  assert lines == []  # nothing done: nothing to say


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
  err = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', err)
  lines = []
  with progress.Progress('scoring', 100, 'images', terminal=True, write=lines.append) as p:
    p.update(10)
    p.update(40)
  out = err.getvalue()
  assert lines == []  # no log lines: the bar
  assert '\r' in out and 'scoring:  50%|' in out and '50/100 images' in out, out


def test_compiling_names_the_program_batch_and_cache(monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(parallel, 'compilation_cache_dir', lambda: '/cache/drc_jax')
  line = progress.compiling('scorer', 64)
  assert line == (
    'compiling the scorer for batch 64 (once per configuration; cached in /cache/drc_jax for '
    'later runs)'
  )
  assert line in caplog.text
  monkeypatch.setattr(parallel, 'compilation_cache_dir', lambda: '')
  assert progress.compiling('train step') == (
    'compiling the train step (once per configuration; no compilation cache: each run compiles)'
  )


def test_compilation_cache_dir_reads_jax():
  old = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    assert parallel.compilation_cache_dir() == ''
    jax.config.update('jax_compilation_cache_dir', '/somewhere')
    assert parallel.compilation_cache_dir() == '/somewhere'
  finally:
    jax.config.update('jax_compilation_cache_dir', old)


def test_one_line_per_compiled_program_not_per_call(monkeypatch):
  said = []
  monkeypatch.setattr(progress, 'compiling', lambda what, batch=None: said.append((what, batch)))
  jitted = jax.jit(lambda w, x: x * w)
  fn = progress.announce_compiles(jitted, 'doubler', batch_arg=1)
  for _ in range(3):
    fn(2.0, jnp.ones((4, 2)))
  assert said == [('doubler', 4)]
  fn(2.0, jnp.ones((3, 2)))  # a new batch size: compiles again
  fn(2.0, jnp.ones((3, 2), jnp.int32))  # a new dtype too
  fn(2.0, jnp.ones((4, 2)))
  assert said == [('doubler', 4), ('doubler', 3), ('doubler', 3)]
  assert fn._cache_size() == len(said)  # a line for each compiled program: jit's own count
  fn(w=2.0, x=jnp.ones((4, 2)))  # keyword arguments count too (jit compiles for them)
  assert said[-1] == ('doubler', None) and fn._cache_size() == len(said)
  assert fn.lower(2.0, jnp.ones((4, 2))) is not None  # the jitted function's attributes


@pytest.mark.parametrize('terminal', [True, False])
def test_log_keeps_the_bar_intact(monkeypatch, caplog, terminal):
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(sys, 'stderr', io.StringIO())
  with progress.Progress('scoring', 10, 'images', terminal=terminal, write=lambda line: None) as p:
    p.update(5)
    p.log('scored shard %d/%d', 1, 2)
  assert 'scored shard 1/2' in caplog.text
