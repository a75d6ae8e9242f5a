"""Restoration benchmark: prints one JSON line (images/s, model calls/s, compile time, peak RSS).

  python -m drc_jax.analysis bench                # RePaint, embedded-default UNet
  python -m drc_jax.analysis bench --config=configs/cifar10.py --batch=64 --steps=50
  python -m drc_jax.analysis bench --forward_only # the UNet forward alone (+ GFLOP/s)

The defaults (RePaint, 50 respaced steps, jump length 10, 2 samples per jump, batch 16) are those
of ``launch/peer/run.sh`` (diffusers' RePaintPipeline in PyTorch), so the two run identical work
when given the same UNet layout; compare them in one session on one machine. Weights are random:
speed does not depend on them.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np

from drc_jax.audit import validate
from drc_jax.core import parallel, progress
from drc_jax.core import schedule as schedule_lib
from drc_jax.drc import degrade as degrade_lib
from drc_jax.drc import restore as restore_lib
from drc_jax.drc import saliency as saliency_lib
from drc_jax.drc import scorer as drc_lib
from drc_jax.models import unet as model_lib
from drc_jax.targets import encoders as encoders_lib
from drc_jax.targets import train as train_lib


def _page_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _host_figures(faults0: int, repeats: int) -> dict:
  """The host's side of a timing: the malloc in use, page faults per timed run (glibc's malloc
  gives freed temporaries back to the kernel, so each run faults them in again; README "Speed")
  and the peak RSS."""
  return {
    'allocator': parallel.host_allocator(),
    'page_faults_per_run': round((_page_faults() - faults0) / repeats),
    'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


def _random_setup(config, batch: int):
  """The config's UNet with random weights (replicated), its schedule, the mesh, and a sharded
  batch of uniform random images with their per-image key data."""
  unet_cfg = model_lib.unet_config_from(config.model, config.data.resolution, config.data.channels)
  model, params = model_lib.DiffusionModel.create(unet_cfg, seed=0)
  schedule = schedule_lib.make_schedule(config.diffusion)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch, '--batch')
  params = parallel.replicate(mesh, params)
  res, ch = config.data.resolution, config.data.channels
  images = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, ch)).astype(np.float32)
  images = parallel.shard_batch(mesh, images)
  key_data = parallel.shard_batch(mesh, drc_lib.image_keys(0, 0, np.arange(batch)))
  return model, params, schedule, mesh, images, key_data


def run_bench(
  config,
  restorer: str,
  batch: int,
  steps: int,
  jump_length: int,
  jump_n_sample: int,
  repeats: int,
  forward_only: bool,
) -> dict:
  """Builds the config's UNet (random weights), restores a batch, returns the figures."""
  model, params, schedule, mesh, images, key_data = _random_setup(config, batch)

  drc_cfg = config.drc.copy_and_resolve_references()
  with drc_cfg.unlocked():
    drc_cfg.restorer, drc_cfg.steps = restorer, steps
    drc_cfg.jump_length, drc_cfg.jump_n_sample = jump_length, jump_n_sample
    drc_cfg.mask, drc_cfg.mask_ratio = 'center_box', 0.25  # the peer's centre mask (half side)
    drc_cfg.t_start = config.diffusion.num_timesteps
  if forward_only:
    fwd = jax.jit(model.apply, **parallel.shardings(mesh, 'rdd', 'd'))
    t = parallel.shard_batch(mesh, np.full((batch,), 500, np.int32))
    run = lambda: fwd(params, images, t)
    nfe = 1
    cost = fwd.lower(params, images, t).cost_analysis() or {}  # XLA's FLOP count of the forward
    gflop = cost.get('flops', float('nan')) / 1e9
  else:
    r = restore_lib.make_restorer(drc_cfg, model, schedule)
    restore = jax.jit(r.restore, **parallel.shardings(mesh, 'rddd', 'd'))
    keys = jax.vmap(jax.random.wrap_key_data)(key_data)
    degrade = jax.jit(degrade_lib.make_degrader(drc_cfg), **parallel.shardings(mesh, 'dd', 'd'))
    d = degrade(keys, images)
    run = lambda: restore(params, key_data, images, d)
    nfe = r.nfe
  progress.compiling('UNet forward' if forward_only else f'{restorer} restorer', batch)
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t0
  faults0 = _page_faults()
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(run())
  dt = (time.perf_counter() - t0) / repeats
  m = config.model
  out = {
    'drc_jax': jax.__version__,
    'backend': jax.default_backend(),
    'devices': jax.device_count(),
    'restorer': 'forward' if forward_only else restorer,
    'batch': batch,
    'res': config.data.resolution,
    'channels': config.data.channels,
    'ch': m.ch,
    'ch_mult': list(m.ch_mult),
    'num_res_blocks': m.num_res_blocks,
    'attn_res': list(m.attn_res),
    'steps': steps,
    'jump_length': jump_length,
    'jump_n_sample': jump_n_sample,
    'params_m': round(model_lib.count_params(params) / 1e6, 3),
    'nfe_per_image': nfe,
    'seconds': round(dt, 3),
    'compile_s': round(compile_s - dt, 2),
    'images_per_s': round(batch / dt, 4),
    'model_calls_per_s': round(nfe / dt, 3),  # batched
    **_host_figures(faults0, repeats),
  }
  if forward_only:
    out['gflop_per_call'] = round(gflop, 3)
    out['gflop_per_s'] = round(gflop / dt, 2)
  return out


def run_drc_bench(config, batch: int, repeats: int) -> dict:
  """Images/s of the config's whole DRC (K restorations per image, degrade, compare) at ``batch``:
  ``--config.drc.restorations=scan|batch`` measures the K restorations in turn or as one batch."""
  model, params, schedule, mesh, images, key_data = _random_setup(config, batch)
  scorer = drc_lib.make_drc(config.drc, model, schedule)
  fn = jax.jit(scorer.similarities, **parallel.shardings(mesh, 'rdd', 'd'))
  progress.compiling('DRC scorer', batch)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, key_data, images))
  compile_s = time.perf_counter() - t0
  faults0 = _page_faults()
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(params, key_data, images))
  dt = (time.perf_counter() - t0) / repeats
  return {
    'mode': 'drc',
    'restorations': config.drc.restorations,
    'num_restorations': int(config.drc.num_restorations),
    'batch': batch,
    'nfe_per_image': scorer.nfe,
    'seconds': round(dt, 3),
    'compile_s': round(compile_s - dt, 2),
    'images_per_s': round(batch / dt, 4),
    **_host_figures(faults0, repeats),
  }


def run_encoder_bench(config, batch: int, repeats: int) -> dict:
  """What DRC's encoders (``drc.saliency_encoder``, ``drc.compare_encoder``) cost per image: calls
  and seconds, timed as the audit runs them (inside one jitted program, on [-1, 1] images of the
  config's size, resized and normalised to the encoder's input)."""
  res, ch, k = config.data.resolution, config.data.channels, int(config.drc.num_restorations)
  images = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, ch)).astype(np.float32)
  out = {}
  for role, field in validate.drc_encoder_fields(config).items():
    enc = encoders_lib.load_encoder(config.drc[field])
    if role == 'saliency':
      fn, calls = jax.jit(saliency_lib.dino_saliency(enc)), 1
    else:
      prepare = encoders_lib.prepare_fn(enc.preprocess)
      fn, calls = jax.jit(lambda p, x, enc=enc, prepare=prepare: enc.embed_fn(p, prepare(x))), 1 + k
    progress.compiling(f'{role} encoder', batch)
    jax.block_until_ready(fn(enc.params, images))  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(fn(enc.params, images))
    per_call = (time.perf_counter() - t0) / repeats / batch
    out[role] = {
      'encoder': config.drc[field],
      'family': enc.family,
      'params_m': round(model_lib.count_params(enc.params) / 1e6, 3),
      'calls_per_image': calls,
      'seconds_per_call': round(per_call, 5),
      'seconds_per_image': round(per_call * calls, 5),
    }
  return out


TRAIN_WARMUP = 2  # steps after the compile run, not timed (the allocator's pools settle)
TRAIN_REPEATS = 20  # timed steps of --train_step when --repeats is not given


def run_train_bench(config, repeats: int) -> dict:
  """Seconds per train step of the config's UNet at config.train.batch_size (random images): the
  median of ``repeats`` steps, each timed alone, after the compile run and TRAIN_WARMUP steps."""
  _, model, params, schedule, tx = train_lib.build(config)
  mesh = parallel.make_mesh()
  bs, res, ch = config.train.batch_size, config.data.resolution, config.data.channels
  parallel.check_batch_size(bs, 'config.train.batch_size')
  step = train_lib.make_train_step(model, schedule, tx, config.train, mesh)
  state = parallel.replicate(mesh, train_lib.init_state(params, tx))
  images = parallel.shard_batch(
    mesh, np.random.default_rng(0).uniform(-1, 1, (bs, res, res, ch)).astype(np.float32)
  )
  valid = parallel.shard_batch(mesh, np.ones((bs,), bool))
  key = jax.random.key(0)
  progress.compiling('train step', bs)
  t0 = time.perf_counter()
  state, m = step(state, images, valid, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(TRAIN_WARMUP):
    state, m = step(state, images, valid, key)
  jax.block_until_ready(m)
  faults0 = _page_faults()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = step(state, images, valid, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  return {
    'mode': 'train_step',
    'backend': jax.default_backend(),
    'devices': jax.device_count(),
    'batch': bs,
    'res': res,
    'channels': ch,
    'params_m': round(model_lib.count_params(params) / 1e6, 3),
    'seconds_per_step': round(dt, 3),
    'seconds_per_step_min': round(min(times), 3),
    'timed_steps': repeats,
    'steps_per_s': round(1 / dt, 3),
    'compile_s': round(compile_s - dt, 2),
    **_host_figures(faults0, repeats),
  }
