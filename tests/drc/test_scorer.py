"""DRC's scoring rules (mean, median, the agree number) and its protocol named in words."""

import ml_collections
import numpy as np
import pytest

from drc_jax.core import config_base, protocol
from drc_jax.drc import scorer as drc_lib


def test_aggregation_rules():
  sims = np.array([[-1.0, -3.0, -5.0], [-0.5, -0.4, -9.0]])
  np.testing.assert_allclose(drc_lib.aggregate(sims, 'mean'), [-3.0, -9.9 / 3])
  np.testing.assert_allclose(drc_lib.aggregate(sims, 'median'), [-3.0, -0.5])
  # the agree number: restorations above the vote threshold
  np.testing.assert_array_equal(drc_lib.aggregate(sims, 'agree', -2.0), [1.0, 2.0])
  with pytest.raises(ValueError, match='vote threshold'):
    drc_lib.aggregate(sims, 'agree')
  with pytest.raises(ValueError, match='config.drc.aggregation'):
    drc_lib.aggregate(sims, 'max')
  with pytest.raises(ValueError, match=r'\[N, K\]'):
    drc_lib.aggregate(sims[0], 'mean')
  # the threshold: a quantile of the given similarities, every restoration pooled
  assert drc_lib.vote_threshold(sims, 0.5) == float(np.median(sims))
  with pytest.raises(ValueError, match='no non-member'):
    drc_lib.vote_threshold(np.zeros((0, 3)), 0.5)


def test_default_protocol_is_described_for_what_it_is():
  c = config_base.load_config('configs/fashion_mnist.py')
  assert drc_lib.describe(c.drc) == (
    'DRC, pixel variant: RePaint 50 steps, jumps 10 x 2; random 4x4 patches over 25% removed; '
    'masked MSE; mean of K = 2'
  )


@pytest.mark.parametrize(
  'spec, region',
  [('configs/cifar10.py:paper', 'dino'), ('configs/celeba.py:paper', 'face')],
)
def test_paper_configs_apply_the_one_paper_protocol(spec, region):
  c = config_base.load_config(spec)
  for field in ('restorer', 't_start', 'steps', 'eta', 'mask_ratio', 'num_restorations'):
    assert c.drc[field] == protocol.PAPER[field], field
  assert c.drc.comparator == protocol.PAPER['comparator'] == 'cosine'
  assert c.drc.aggregation == protocol.PAPER['aggregation'] == 'agree'
  assert c.drc.mask == ('saliency_patches' if region == 'dino' else 'face')
  assert protocol.PAPER['important_region'][{'dino': 'natural', 'face': 'faces'}[region]] == region
  assert drc_lib.describe(c.drc).startswith('DRC, semantic variant: DDIM 200 steps;')
  assert drc_lib.describe(c.drc).endswith('agree number of K = 4 votes')
  # every piece of the paper's protocol names its source
  assert set(protocol.SOURCES) >= set(protocol.PAPER) - {'t_start', 'steps', 'eta'}


def test_the_word_paper_means_the_paper_protocol_only():
  """The sweep and the frontier call a row "the paper" only when it runs PAPER's restorer; the
  frontier's reference is RePaint's published schedule, named as such."""
  from drc_jax.analysis import frontier, sweep

  for label, overrides, _ in sweep.GRID + frontier.GRID:
    if 'paper' in label:
      assert {k: overrides[k] for k in protocol.paper_restorer()} == protocol.paper_restorer()
  label, overrides, _ = frontier.GRID[0]
  assert overrides == protocol.REPAINT_PUBLISHED and 'RePaint' in label
  base = ml_collections.ConfigDict(config_base.base_config().drc.to_dict())
  protocol.paper_pixel(base)
  assert (base.steps, base.mask, base.aggregation) == (200, 'center_box', 'mean')
