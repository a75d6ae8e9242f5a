"""The benchmark runs the real restorer and reports its work and cost."""

import os

import pytest
from conftest import load_config

from drc_jax.analysis import bench
from drc_jax.core import schedule


def test_bench_reports_figures_and_work():
  c = load_config('fashion_mnist', 'runlocal')
  out = bench.run_bench(
    c, 'repaint', batch=8, steps=6, jump_length=2, jump_n_sample=2, repeats=1, forward_only=False
  )
  assert out['nfe_per_image'] == 6 + 2 * 1 * 2  # 6 steps + one jump of 2 at t = 0 and t = 2
  for k in ('images_per_s', 'model_calls_per_s', 'compile_s', 'peak_rss_mb', 'params_m'):
    assert out[k] > 0, k
  assert (out['res'], out['channels'], out['ch'], out['ch_mult']) == (16, 1, 16, [1, 2])
  fwd = bench.run_bench(c, 'repaint', 8, 6, 2, 2, 1, forward_only=True)
  assert fwd['restorer'] == 'forward' and fwd['nfe_per_image'] == 1
  # XLA's FLOP count of the forward: proportional to the batch, and a rate from the measured time
  fwd16 = bench.run_bench(c, 'repaint', 16, 6, 2, 2, 1, forward_only=True)
  assert fwd['gflop_per_call'] > 0 and fwd['gflop_per_s'] > 0
  assert abs(fwd16['gflop_per_call'] / fwd['gflop_per_call'] - 2.0) < 0.01
  assert 'gflop_per_call' not in out  # a restoration reports model calls, not one program's FLOPs


def test_train_step_bench():
  c = load_config('fashion_mnist', 'runlocal')
  out = bench.run_train_bench(c, repeats=1)
  assert out['steps_per_s'] > 0 and out['batch'] == c.train.batch_size
  # the host's side: which malloc (the launchers preload tcmalloc) and the page faults of a step
  assert out['allocator'] in ('tcmalloc', 'default') and out['page_faults_per_run'] >= 0


def test_encoder_bench_reports_calls_and_time():
  c = load_config('cifar10', 'paper,runlocal')
  out = bench.run_encoder_bench(c, batch=4, repeats=1)
  k = c.drc.num_restorations
  assert out['saliency']['calls_per_image'] == 1 and out['compare']['calls_per_image'] == 1 + k
  for role in ('saliency', 'compare'):
    assert out[role]['seconds_per_image'] > 0 and out[role]['params_m'] > 0


def test_drc_bench_both_ways():
  c = load_config('fashion_mnist', 'runlocal')
  for how in ('scan', 'batch'):
    with c.unlocked():
      c.drc.restorations = how
    out = bench.run_drc_bench(c, batch=8, repeats=1)
    assert out['restorations'] == how and out['images_per_s'] > 0
    calls = schedule.repaint_counts(schedule.repaint_jumps(c.drc.steps, 2, 2))[0]
    assert (c.drc.restorer, c.drc.jump_length, c.drc.jump_n_sample) == ('repaint', 2, 2)
    assert out['nfe_per_image'] == c.drc.num_restorations * calls


def test_train_step_comparison_script_runs_the_same_step_both_sides():
  """launch/bench_train_vs_peer.sh: drc_jax's train-step bench and the PyTorch step, same batch."""

  import subprocess  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
    ['bash', 'launch/bench_train_vs_peer.sh'],
    cwd=repo,
    env=dict(os.environ, DRY_RUN='1', BATCH='32'),
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert '--train_step' in out[0] and '--config.train.batch_size=32' in out[0]
  assert 'launch/torch_train_step.py' in out[1] and '--batch 32' in out[1]


def test_the_pytorch_peer_runs_from_the_repository_alone():
  """launch/peer/run.sh: diffusers' RePaintPipeline on drc_jax's UNet layout, the same model calls
  per image as drc_jax's RePaint of the same schedule, with nothing outside the checkout."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  pytest.importorskip('diffusers')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = '--ch 16 --ch-mult 1,2 --num-res-blocks 1 --attn-res 8 --res 16 --channels 1 --batch 2'
  out = subprocess.run(
    [
      'bash',
      'launch/peer/run.sh',
      *args.split(),
      '--steps',
      '6',
      '--jump-length',
      '2',
      '--jump-n-sample',
      '2',
      '--repeats',
      '1',
    ],
    cwd=repo,
    capture_output=True,
    text=True,
    check=True,
    timeout=600,
  ).stdout.splitlines()[-1]
  peer = json.loads(out)
  assert peer['nfe_per_image'] == schedule.repaint_counts(schedule.repaint_jumps(6, 2, 2))[0]
  assert peer['batch'] == 2 and peer['images_per_s'] > 0


def test_no_file_reaches_outside_the_checkout():
  import subprocess  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  hits = subprocess.run(
    ['git', 'grep', '-n', '-F', '-e', '../shared', '--', '.', ':!tests/analysis/test_bench.py'],
    cwd=repo,
    capture_output=True,
    text=True,
  ).stdout
  assert not hits, hits
