"""Trains the target DDPM on the member split only (the membership benchmark protocol).

One ``jax.jit`` train step: epsilon-prediction MSE at uniform t, Adam with linear warm-up and
global-norm clipping, EMA of the weights; the batch is sharded on the ('data',) mesh and the state
replicated. The data order is a function of (seed, step) alone, so a run killed at any point and
restarted from its last checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from drc_jax.core import errors, export_cache, parallel, progress, streams
from drc_jax.core import schedule as schedule_lib
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib
from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints

State = dict[str, Any]  # {'step', 'params', 'ema_params', 'opt_state'}


def make_optimizer(tcfg) -> optax.GradientTransformation:
  warmup = max(int(tcfg.warmup_steps), 1)
  lr = optax.linear_schedule(0.0, tcfg.lr, warmup)  # constant tcfg.lr after warm-up
  return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), optax.adam(lr))


def init_state(model_params, tx: optax.GradientTransformation) -> State:
  return {
    'step': jnp.zeros((), jnp.int32),
    'params': model_params,
    'ema_params': jax.tree_util.tree_map(jnp.copy, model_params),
    'opt_state': tx.init(model_params),
  }


def make_train_step(
  model: model_lib.DiffusionModel,
  schedule: schedule_lib.NoiseSchedule,
  tx: optax.GradientTransformation,
  tcfg,
  mesh,
):
  """Returns a jitted ``step(state, images [B,H,W,C], valid [B], key) -> (state, metrics)``."""
  num_t = schedule.num_timesteps

  def loss_fn(params, images, valid, key):
    k_t, k_eps, k_flip, k_drop = jax.random.split(key, 4)
    b = images.shape[0]
    if tcfg.random_flip:
      flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
      images = jnp.where(flip, images[:, :, ::-1, :], images)
    t = jax.random.randint(k_t, (b,), 0, num_t)
    eps = jax.random.normal(k_eps, images.shape, images.dtype)
    x_t = schedule.q_sample(images, t, eps)
    pred = model.apply_train(params, x_t, t, k_drop)
    per_example = jnp.mean(jnp.square(pred - eps), axis=(1, 2, 3))  # [B]
    w = valid.astype(jnp.float32)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)

  def step(state, images, valid, key):
    key = jax.random.fold_in(key, state['step'])
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], images, valid, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # EMA warm-up: the decay grows as (1 + step) / (10 + step) up to ema_decay, so that short runs
    # do not keep a large share of the random initial weights (0.999^1000 would keep 37%).
    step_f = state['step'].astype(jnp.float32)
    d = jnp.minimum(tcfg.ema_decay, (1.0 + step_f) / (10.0 + step_f))
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state['ema_params'], params)
    new = {'step': state['step'] + 1, 'params': params, 'ema_params': ema, 'opt_state': opt_state}
    return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(
    step, in_shardings=(rep, dat, dat, rep), out_shardings=(rep, rep), donate_argnums=(0,)
  )


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Global batch of member positions for ``step``: epochs of seeded permutations, no repeats
  within an epoch; a function of (seed, step) alone, so resuming reproduces the order."""
  out, pos = [], step * batch_size
  while len(out) < batch_size:
    epoch, offset = divmod(pos, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    take = perm[offset : offset + batch_size - len(out)]
    out.extend(take)
    pos += len(take)
  return np.asarray(out, np.int64)


def build(config):
  """Model config, model, schedule and optimizer of a config."""
  unet_cfg = model_lib.unet_config_from(config.model, config.data.resolution, config.data.channels)
  model, params = model_lib.DiffusionModel.create(unet_cfg, seed=config.seed)
  schedule = schedule_lib.make_schedule(config.diffusion)
  return unet_cfg, model, params, schedule, make_optimizer(config.train)


def train(config, workdir: str) -> State:
  """Trains (or resumes training) the target in ``workdir`` up to ``config.train.steps``."""
  tcfg = config.train
  parallel.check_batch_size(tcfg.batch_size, 'config.train.batch_size')
  mesh = parallel.make_mesh()
  source = splits_lib.run_source(config)
  split = splits_lib.resolve(config.split, source, workdir, write=False)
  members, _, _ = data_lib.load_images(source, split.members, config.data)  # [N, H, W, C]
  logging.info('training on %d members of %s at %s', len(members), source.name, members.shape)
  data_identity = splits_lib.training_data(config, source, split)

  unet_cfg, model, params, schedule, tx = build(config)
  model_json = epath.Path(workdir) / checkpoints.MODEL_JSON
  if model_json.exists():
    # Never overwrite the description of a target already in the workdir with another one, nor
    # train it further on other data.
    old_unet, old_diffusion = checkpoints.load_model_json(workdir)
    if old_unet != unet_cfg or old_diffusion != dict(config.diffusion):
      raise checkpoints.CheckpointError(
        f'{workdir} holds a target of another architecture or schedule ({model_json}); use '
        f'another --workdir'
      )
    recorded = checkpoints.trained_on(workdir)
    if recorded is None:
      logging.warning(
        '%s records no training data (trained by an older drc_jax): the members '
        'of this run are not checked against it',
        model_json,
      )
    splits_lib.check_trained_on(recorded, data_identity, str(model_json))
  elif parallel.is_writer():
    checkpoints.save_model_json(workdir, unet_cfg, dict(config.diffusion), trained_on=data_identity)
  if parallel.is_writer():
    splits_lib.write_to_workdir(split, workdir)
  logging.info('UNet: %.3fM parameters', model_lib.count_params(params) / 1e6)
  state = init_state(params, tx)
  mngr = checkpoints.manager(workdir, keep=tcfg.keep_checkpoints)
  if mngr.latest_step() is not None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore(mngr, abstract)
    logging.info('resumed from step %d', int(state['step']))
  state = parallel.replicate(mesh, state)
  # kept lowered on disk (export_cache): what the step's closure depends on is the config
  key_doc = json.dumps(
    {'config': config.to_dict(), 'mesh': str(mesh)}, sort_keys=True, default=list
  )
  train_step = progress.announce_compiles(
    export_cache.Exported(
      make_train_step(model, schedule, tx, tcfg, mesh),
      'train step',
      key_doc,
      donate_argnums=(0,),
      out_like=lambda state, *_: (state, {'loss': 0, 'grad_norm': 0}),  # (new state, metrics)
    ),
    'train step',
    batch_arg=1,
  )
  key = jax.random.fold_in(jax.random.key(config.seed), streams.TRAIN)
  n_proc, p_idx = jax.process_count(), jax.process_index()
  local = tcfg.batch_size // n_proc

  step = start = int(state['step'])
  # A bar on a terminal, a line at least every 10 s in a log; the time left leaves out the first
  # step (compilation). A step counts once its metrics are computed: waiting for the step before
  # the one just dispatched keeps the device busy.
  bar = progress.Progress('training', tcfg.steps - start, 'steps')
  in_flight = None
  while step < tcfg.steps:
    idx = batch_indices(step, len(members), tcfg.batch_size, config.seed)
    rows = members[idx[p_idx * local : (p_idx + 1) * local]]
    images = parallel.shard_batch(mesh, rows)
    valid = parallel.shard_batch(mesh, np.ones((local,), bool))
    state, metrics = train_step(state, images, valid, key)
    step += 1
    if in_flight is not None:
      jax.block_until_ready(in_flight)
      bar.update(1)
    in_flight = metrics
    if step % tcfg.log_every == 0 or step == tcfg.steps:
      loss = float(metrics['loss'])
      bar.update(1)
      in_flight = None
      if not np.isfinite(loss):
        raise errors.TrainingError(
          f'training loss became {loss} at step {step} in {workdir}: lower config.train.lr or '
          f'raise config.train.warmup_steps; the run resumes from its last checkpoint'
        )
      bar.log(
        'step %d/%d loss %.5f grad_norm %.3f', step, tcfg.steps, loss, float(metrics['grad_norm'])
      )
    if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
      checkpoints.save_state(mngr, step, state)
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  return state


def trained_steps(workdir: str) -> int | None:
  """Latest checkpointed step in ``workdir`` (None when there is none)."""
  if not (epath.Path(workdir) / checkpoints.CHECKPOINT_DIR).exists():
    return None
  mngr = checkpoints.manager(workdir)
  step = mngr.latest_step()
  mngr.close()
  return step
