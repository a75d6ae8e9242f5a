"""DRC against ReDiffuse at equal calls: the figures from two audits' scores."""

import numpy as np
import pytest
from conftest import load_config

from drc_jax.analysis import black_box
from drc_jax.audit import metrics, results
from drc_jax.core import errors


def _tables(shift_drc: float, shift_red: float, n: int = 100):
  rng = np.random.default_rng(0)
  split = np.repeat(np.array([1, 0], np.int8), n)
  index = np.concatenate([np.arange(n), np.arange(n, 2 * n)])
  base = rng.normal(size=2 * n)
  return (
    {'split': split, 'index': index, 'score': base + shift_drc * split},
    {'split': split, 'index': index, 'score': rng.normal(size=2 * n) + shift_red * split},
  )


def test_every_budget_is_reported_on_the_held_out_part_with_a_paired_interval():
  config = load_config('fashion_mnist')
  config.audit.bootstrap = 100
  tables, calls = {}, {}
  for budget in (20, 40):
    tables[budget, 'drc'], tables[budget, 'rediffuse'] = _tables(2.0, 0.0)
    calls[budget, 'drc'] = calls[budget, 'rediffuse'] = budget
  doc = black_box.figures(config, tables, calls, [20, 40])
  drc = tables[20, 'drc']
  held = results.heldout_rows(config, {'split': drc['split']})
  assert doc['n_heldout'] == {'members': 80, 'nonmembers': 80}
  row = doc['rows'][0]
  want = metrics.auc(
    drc['score'][held & (drc['split'] == 1)], drc['score'][held & (drc['split'] == 0)]
  )
  assert row['drc']['auc'] == want and row['drc']['model_calls'] == 20
  assert row['rediffuse']['auc_ci95'][0] < 0.5 + 0.15  # no signal: near chance
  lo, hi = row['auc_drc_minus_rediffuse_ci95']
  assert lo > 0 and lo < row['auc_drc_minus_rediffuse'] < hi
  table = black_box.format_table(doc)
  assert table.count('\n| 20 |') == 1 and '80 members, 80 non-members' in table


def test_two_audits_of_different_images_are_refused():
  config = load_config('fashion_mnist')
  drc, red = _tables(1.0, 1.0)
  red = {**red, 'index': red['index'][::-1].copy()}
  with pytest.raises(errors.UserError, match='different images'):
    black_box.figures(
      config,
      {(20, 'drc'): drc, (20, 'rediffuse'): red},
      {(20, 'drc'): 20, (20, 'rediffuse'): 20},
      [20],
    )


def test_each_grid_setting_spends_its_budget():
  config = load_config('fashion_mnist')
  for budget, settings in black_box.GRID.items():
    drc = black_box.setting_config(config, 'drc', settings['drc'])
    k, steps = drc.drc.num_restorations, drc.drc.steps
    jumps = (steps // drc.drc.jump_length - 1) * (drc.drc.jump_n_sample - 1) * drc.drc.jump_length
    assert k * (steps + jumps) == budget, budget
    red = black_box.setting_config(config, 'rediffuse', settings['rediffuse'])
    a = red.attacks
    assert a.rediffuse_n * (a.rediffuse_t // a.rediffuse_k) == budget
    assert drc.attacks.names == 'drc' and red.audit.num_samples == 0
