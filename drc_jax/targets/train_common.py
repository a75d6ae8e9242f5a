"""What the two trainers share (``targets/train.py``, the DDPM; ``targets/train_text.py``, a
text-conditioned UNet): the member images, the optimizer, the training state, the noised batch
and its loss, one pure train step with the EMA
warm-up, the batch order and the loop that logs, checks the loss and checkpoints.

The pure step is jitted by the trainer's program boundary (``targets/train.py``). The data order is
a function of (seed, step) alone, so a run killed at any point and restarted from its last
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from drc_jax.core import errors, parallel, progress
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib

State = dict[str, Any]  # {'step', 'params', 'ema_params', 'opt_state'}


def make_optimizer(tcfg) -> optax.GradientTransformation:
  """Adam with a linear warm-up to ``tcfg.lr`` and global-norm clipping at ``tcfg.grad_clip``."""
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


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """The EMA decay at ``step`` (the step's count before the update): it grows as
  (1 + step) / (10 + step) up to ``decay``, so that short runs do not keep a large share of the
  random initial weights (0.999^1000 would keep 37%)."""
  step_f = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step_f) / (10.0 + step_f))


def member_data(config, workdir: str):
  """What every trainer starts from: ``(mesh, source, split, members [N, H, W, C], data
  identity)``, the batch size checked against the devices and the split read (or drawn) but not
  written (the trainer writes it with its first checkpoint)."""
  parallel.check_batch_size(config.train.batch_size, 'config.train.batch_size')
  mesh = parallel.make_mesh()
  source = splits_lib.run_source(config)
  split = splits_lib.resolve(config.split, source, workdir, write=False)
  members, _, _ = data_lib.load_images(source, split.members, config.data)  # [N, H, W, C]
  logging.info('training on %d members of %s at %s', len(members), source.name, members.shape)
  return mesh, source, split, members, splits_lib.training_data(config, source, split)


def noised_batch(tcfg, schedule, images: jax.Array, key: jax.Array):
  """A training batch's diffusion inputs: random horizontal flips (``tcfg.random_flip``), t uniform
  over the schedule, eps normal. Returns ``(x_t, t, eps, k_drop)``, ``k_drop`` the key left for the
  model's dropout or caption dropout. The key is split the same way in every trainer, so a step
  draws the same t and eps whatever the model."""
  k_t, k_eps, k_flip, k_drop = jax.random.split(key, 4)
  b = images.shape[0]
  if tcfg.random_flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1, :], images)
  t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps)
  eps = jax.random.normal(k_eps, images.shape, images.dtype)
  return schedule.q_sample(images, t, eps), t, eps, k_drop


def masked_mean_mse(pred: jax.Array, eps: jax.Array, valid: jax.Array) -> jax.Array:
  """The epsilon MSE averaged over the valid rows of a padded batch."""
  per_example = jnp.mean(jnp.square(pred - eps), axis=(1, 2, 3))  # [B]
  w = valid.astype(jnp.float32)
  return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation, tcfg):
  """The pure train step ``step(state, *batch, key) -> (state, {'loss', 'grad_norm'})`` of
  ``loss_fn(params, *batch, key) -> scalar``: the key folded with the step, one optimizer update,
  the EMA (``ema_decay``)."""

  def step(state, *args):
    *batch, key = args
    key = jax.random.fold_in(key, state['step'])
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], *batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    d = ema_decay(state['step'], tcfg.ema_decay)
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state['ema_params'], params)
    new = {'step': state['step'] + 1, 'params': params, 'ema_params': ema, 'opt_state': opt_state}
    return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return step


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


def run_loop(
  state: State,
  train_step: Callable,
  batch_args: Callable[[int], tuple],
  tcfg,
  workdir: str,
  on_checkpoint: Callable[[int, State], None],
) -> State:
  """Runs ``train_step(state, *batch_args(step))`` from the state's step up to ``tcfg.steps``.

  A bar on a terminal, a line at least every 10 s in a log; the time left leaves out the first
  step (compilation). A step counts once its metrics are computed: waiting for the step before the
  one just dispatched keeps the device busy. Every ``tcfg.log_every`` steps the loss is logged
  (a non-finite one is a ``TrainingError``); every ``tcfg.checkpoint_every`` steps and at the end
  ``on_checkpoint(step, state)`` saves.
  """
  step = start = int(state['step'])
  bar = progress.Progress('training', tcfg.steps - start, 'steps')
  in_flight = None
  while step < tcfg.steps:
    state, metrics = train_step(state, *batch_args(step))
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
      on_checkpoint(step, state)
  bar.close()
  return state
