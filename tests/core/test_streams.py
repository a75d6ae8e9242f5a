"""The random streams: one table (drc_jax.core.streams) whose numbers cannot meet, used by DRC."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from drc_jax.core import config_base, streams
from drc_jax.core import schedule as S
from drc_jax.drc import degrade as D
from drc_jax.drc import scorer as drc_lib


def test_the_table_has_no_collisions():
  seed_level = [streams.TRAIN, streams.SAMPLES, *streams.ATTACKS.values()]
  assert len(set(seed_level)) == len(seed_level)
  used = streams.restoration_streams(streams.MAX_STEPS - 1)
  numbers = sorted((r.start, r.stop, kind) for kind, r in used.items())
  for (_, stop, a), (start, _, b) in zip(numbers, numbers[1:]):
    assert stop <= start, (a, b)  # disjoint ranges, whatever the number of steps
  assert numbers[-1][1] <= 2**31  # fold_in data fits an int32 step counter plus offset
  # The collision of the issue: the degradation key was fold_in(key, 7), restorer step 7's too.
  assert streams.DEGRADE not in used['step'] and 7 in used['step']


class _ZeroModel:
  def apply(self, params, x, t):
    del params, t
    return jnp.zeros_like(x)


def test_drc_draws_its_mask_from_the_degrade_stream():
  cfg = ml_collections.ConfigDict(config_base.base_config().drc.to_dict())
  cfg.update(restorer='ddim', steps=8, eta=1.0, mask='random_box', num_restorations=1)
  scorer = drc_lib.make_drc(cfg, _ZeroModel(), S.NoiseSchedule.create('linear', 1000))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)), jnp.float32)
  key_data = drc_lib.image_keys(0, streams.ATTACKS['drc'], np.arange(4))
  degraded, _ = scorer.evidence(None, key_data, images)
  restoration = jax.vmap(lambda kd: jax.random.fold_in(jax.random.wrap_key_data(kd), 0))(key_data)
  want = D.make_degrader(cfg)(
    jax.vmap(lambda k: jax.random.fold_in(k, streams.DEGRADE))(restoration), images
  )
  np.testing.assert_array_equal(np.asarray(degraded)[:, 0], np.asarray(want.degraded_image(1)))
