"""Throughput and ETA of a long loop whose first step includes compilation.

The first update of a ``Throughput`` only starts its clock: the first batch (or train step) of a
run includes XLA compilation, often far longer than the work (an audit's first line said 590 s
for 10 s of work). Rates and ETAs count from the end of the first update on.
"""

from __future__ import annotations

import time


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

  def describe(self, unit: str) -> str:
    """'12.34 <unit>/s, ETA 56s', or why there is no estimate yet."""
    rate = self.rate()
    if self.done >= self.total:
      return f'{rate:.2f} {unit}/s, done' if rate else 'done'
    if rate is None:
      return 'ETA after the next batch (the first one included compilation)'
    return f'{rate:.2f} {unit}/s, ETA {(self.total - self.done) / rate:.0f}s'
