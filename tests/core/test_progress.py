"""Throughput and ETA leave out the first update, which includes compilation."""

from drc_jax.core import progress


def test_the_first_update_is_left_out():
  speed = progress.Throughput(total=100)
  speed.update(10, now=590.0)  # the first batch: 590 s, nearly all of it compilation
  assert speed.rate() is None and 'ETA after the next batch' in speed.describe('images')
  speed.update(10, now=592.0)  # 10 images in 2 s
  assert speed.rate() == 5.0
  assert speed.describe('images') == '5.00 images/s, ETA 16s'  # 80 left at 5 per second
  speed.update(80, now=608.0)
  assert speed.describe('images') == '5.00 images/s, done'
