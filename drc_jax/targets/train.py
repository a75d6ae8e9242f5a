"""Trains the target DDPM on the member split only (the membership benchmark protocol).

One ``jax.jit`` train step: epsilon-prediction MSE at uniform t, Adam with linear warm-up and
global-norm clipping, EMA of the weights; the batch is sharded on the ('data',) mesh and the state
replicated. The data order is a function of (seed, step) alone, so a run killed at any point and
restarted from its last checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from drc_jax.core import export_cache, parallel, progress, streams
from drc_jax.core import schedule as schedule_lib
from drc_jax.data import splits as splits_lib
from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints, train_common, train_text

State = train_common.State  # {'step', 'params', 'ema_params', 'opt_state'}
# shared with targets/train_text.py (train_common.py), named here as before
make_optimizer = train_common.make_optimizer
init_state = train_common.init_state
batch_indices = train_common.batch_indices


def make_train_step(
  model: model_lib.DiffusionModel,
  schedule: schedule_lib.NoiseSchedule,
  tx: optax.GradientTransformation,
  tcfg,
  mesh,
):
  """Returns a jitted ``step(state, images [B,H,W,C], valid [B], key) -> (state, metrics)``."""

  def loss_fn(params, images, valid, key):
    x_t, t, eps, k_drop = train_common.noised_batch(tcfg, schedule, images, key)
    pred = model.apply_train(params, x_t, t, k_drop)
    return train_common.masked_mean_mse(pred, eps, valid)

  step = train_common.make_step(loss_fn, tx, tcfg)  # EMA with warm-up (train_common.ema_decay)
  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(
    step, in_shardings=(rep, dat, dat, rep), out_shardings=(rep, rep), donate_argnums=(0,)
  )


def build(config):
  """Model config, model, schedule and optimizer of a config."""
  unet_cfg = model_lib.unet_config_from(config.model, config.data.resolution, config.data.channels)
  model, params = model_lib.DiffusionModel.create(unet_cfg, seed=config.seed)
  schedule = schedule_lib.make_schedule(config.diffusion)
  return unet_cfg, model, params, schedule, make_optimizer(config.train)


def train(config, workdir: str) -> State:
  """Trains (or resumes training) the target in ``workdir`` up to ``config.train.steps``; a
  text-conditioned target (``config.text_model`` set) by ``targets/train_text.py``."""
  if config.get('text_model'):
    return train_text.train(config, workdir, jax.jit)
  tcfg = config.train
  mesh, source, split, members, data_identity = train_common.member_data(config, workdir)

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

  def batch_args(step):
    idx = batch_indices(step, len(members), tcfg.batch_size, config.seed)
    rows = members[idx[p_idx * local : (p_idx + 1) * local]]
    valid = np.ones((local,), bool)
    return parallel.shard_batch(mesh, rows), parallel.shard_batch(mesh, valid), key

  state = train_common.run_loop(
    state,
    train_step,
    batch_args,
    tcfg,
    workdir,
    lambda step, state: checkpoints.save_state(mngr, step, state),
  )
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
