"""``load_target``: a trained or converted target diffusion model as one jitted epsilon predictor.

  target = drc_jax.load_target('runs/secmi_cifar10')       # a workdir: the latest checkpoint
  target = drc_jax.load_target('runs/cifar10/checkpoints/800000')  # one step of a workdir
  eps = target.apply(x, t)  # x [B, H, W, C] float32 in [-1, 1], t int [B] or scalar -> [B, H, W, C]

A workdir holds ``model.json`` (architecture and noise schedule) and ``checkpoints/`` (orbax); it is
written by ``--mode=train`` or by ``python -m drc_jax.convert`` from a PyTorch checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from drc_jax import checkpoints
from drc_jax import schedule as schedule_lib
from drc_jax.models import unet as model_lib


@dataclasses.dataclass(frozen=True)
class Target:
  """A target model with its EMA weights and noise schedule.

  Attributes:
    model: the UNet as (config, graphdef) with pure apply functions.
    params: EMA parameters (jax arrays).
    schedule: the noise schedule the model was trained with.
    step: training step of the checkpoint (0 for most converted models).
  """

  model: model_lib.DiffusionModel
  params: Any
  schedule: schedule_lib.NoiseSchedule
  step: int
  _eps_fn: Callable[..., jax.Array] = dataclasses.field(repr=False, compare=False)

  @classmethod
  def create(
    cls,
    model: model_lib.DiffusionModel,
    params,
    schedule: schedule_lib.NoiseSchedule,
    step: int = 0,
  ) -> Target:
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return cls(model, params, schedule, step, jax.jit(model.apply))

  @property
  def config(self) -> model_lib.UNetConfig:
    return self.model.config

  def apply(self, x, t) -> jax.Array:
    """Epsilon prediction of the model.

    Args:
      x: [B, H, W, C] float images in [-1, 1] (NHWC), C = config.in_channels.
      t: integer timesteps in [0, T), [B] or a scalar (same step for the whole batch).

    Returns:
      [B, H, W, C_out] float32 epsilon prediction.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise ValueError(f'x must be [B, H, W, {self.config.in_channels}] (NHWC), got {x.shape}')
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
      raise TypeError(f't must hold integer timesteps, got dtype {t.dtype}')
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
      raise ValueError(f't must be a scalar or [B={x.shape[0]}], got shape {t.shape}')
    t = jnp.broadcast_to(t.astype(jnp.int32), (x.shape[0],))  # [B]
    return self._eps_fn(self.params, x, t)


def _restore_step(workdir: epath.Path, step_dir: epath.Path) -> Target:
  """A Target from one checkpoint step directory ``workdir/checkpoints/<step>``."""
  unet_cfg, diffusion = checkpoints.load_model_json(workdir)
  model, abstract = model_lib.abstract_model(unet_cfg)
  params = jax.tree_util.tree_map(np.asarray, checkpoints.restore_ema(step_dir, abstract))
  bad = [k for k, v in model_lib.flat_params(params).items() if not np.all(np.isfinite(v))]
  if bad:
    raise checkpoints.CheckpointError(f'{step_dir}: non-finite weights in {bad[:5]}')
  return Target.create(model, params, checkpoints.schedule_from(diffusion), int(step_dir.name))


def _load_weights_dir(path: epath.Path) -> Target:
  """A Target from a safetensors directory (a shipped target), its hashes checked first."""
  from drc_jax import shipped  # pylint: disable=g-import-not-at-top

  shipped.verify(path)
  unet_cfg, diffusion = checkpoints.load_model_json(path)
  model, abstract = model_lib.abstract_model(unet_cfg)
  params = shipped.load_params(path, abstract)
  step = int(json.loads((path / checkpoints.MODEL_JSON).read_text()).get('step', 0))
  return Target.create(model, params, checkpoints.schedule_from(diffusion), step)


def load_target(path) -> Target:
  """Loads a target model for auditing.

  Args:
    path: a drc_jax workdir (``model.json`` + ``checkpoints/``; its latest step is used), its
      ``checkpoints`` folder, one step directory ``W/checkpoints/<step>``, a safetensors target
      directory (``model.json`` + ``ema.safetensors``), or ``shipped:<name>`` (a target shipped
      inside drc_jax, e.g. ``shipped:fashion_mnist``).

  Returns:
    The Target: ``.apply(x, t)`` (jitted), ``.config``, ``.params``, ``.schedule``, ``.model``.

  Raises:
    checkpoints.CheckpointError: ``path`` is none of these, or its checkpoint does not match
      ``model.json`` (the message names the keys).
  """
  from drc_jax import shipped  # pylint: disable=g-import-not-at-top

  path = epath.Path(shipped.resolve(path))
  if shipped.is_weights_dir(path):
    return _load_weights_dir(path)
  if (path / checkpoints.MODEL_JSON).exists():
    ckpt_dir = path / checkpoints.CHECKPOINT_DIR
    step = None
    if ckpt_dir.exists():
      mngr = checkpoints.manager(path)
      step = mngr.latest_step()
      mngr.close()
    if step is None:
      raise checkpoints.CheckpointError(f'{ckpt_dir}: no checkpoint found')
    return _restore_step(path, ckpt_dir / str(step))
  parent = path.parent
  if path.name == checkpoints.CHECKPOINT_DIR and (parent / checkpoints.MODEL_JSON).exists():
    return load_target(parent)
  if (
    path.name.isdigit()
    and parent.name == checkpoints.CHECKPOINT_DIR
    and (parent.parent / checkpoints.MODEL_JSON).exists()
  ):
    if not path.is_dir():
      raise checkpoints.CheckpointError(f'{path}: no such checkpoint step')
    return _restore_step(parent.parent, path)
  what = 'does not exist' if not path.exists() else 'is not a drc_jax target'
  raise checkpoints.CheckpointError(
    f'{path} {what}: expected a workdir holding {checkpoints.MODEL_JSON} and '
    f'{checkpoints.CHECKPOINT_DIR}/ (made by --mode=train, or by python -m drc_jax.convert from '
    f'a PyTorch checkpoint), or a step directory W/{checkpoints.CHECKPOINT_DIR}/<step>'
  )
