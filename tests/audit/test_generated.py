"""The generated-image control's pieces: samples as images, disjoint keys, the FPR it reports."""

import numpy as np

from drc_jax.audit import generated
from drc_jax.core import streams
from drc_jax.drc import scorer as drc_lib


def test_samples_become_8bit_images_in_order():
  x = np.linspace(-1.2, 1.2, 2 * 4 * 4).reshape(2, 4, 4, 1)
  src = generated.SampleSource(x)
  raw, labels = src.read([1, 0])
  assert raw.dtype == np.uint8 and raw.shape == (2, 4, 4, 1)
  np.testing.assert_array_equal(raw[1], src.images[0])
  assert raw.min() == 0 and src.images.max() == 255  # clipped to [-1, 1] first
  np.testing.assert_array_equal(labels, [-1, -1])
  assert len(src) == 2


def test_generated_keys_never_meet_a_real_images_keys():
  idx = np.arange(64)
  gen = generated.keys_for(['drc', 'loss'], 0, idx)
  real = {tuple(k) for n in streams.ATTACKS for k in drc_lib.image_keys(0, streams.ATTACKS[n], idx)}
  for name, keys in gen.items():
    assert not real & {tuple(k) for k in keys}, name
  assert not {tuple(k) for k in gen['drc']} & {tuple(k) for k in gen['loss']}


def test_control_counts_samples_at_or_above_the_calibrated_threshold():
  metrics = {
    'a': {'calibrated': {'threshold': 0.5, 'fpr': 0.1, 'ci95': {'fpr': [0.05, 0.2]}}},
    'b': {'calibrated': {'threshold': 2.0, 'fpr': 0.0, 'ci95': {'fpr': [0.0, 0.1]}}},
  }
  out = generated.control(metrics, {'a': np.array([0.5, 0.4, 0.9, 0.1]), 'b': np.array([1.0, 3.0])})
  assert out['a']['fpr'] == 0.5 and out['a']['n'] == 4  # 0.5 itself is called a member
  assert out['b']['fpr'] == 0.5
  lo, hi = out['a']['ci95']
  assert lo < 0.5 < hi
  assert out['a']['real_nonmember_fpr'] == 0.1 and out['a']['real_nonmember_ci95'] == [0.05, 0.2]
