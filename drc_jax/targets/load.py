"""``load_target``: a trained or converted target diffusion model as one jitted epsilon predictor.

  target = drc_jax.load_target('runs/secmi_cifar10')       # a workdir: the latest checkpoint
  target = drc_jax.load_target('runs/cifar10/checkpoints/800000')  # one step of a workdir
  eps = target.apply(x, t)  # x [B, H, W, C] float32 in [-1, 1], t int [B] or scalar -> [B, H, W, C]

A workdir holds ``model.json`` (architecture and noise schedule) and ``checkpoints/`` (orbax); it is
written by ``--mode=train`` or by ``python -m drc_jax.convert`` from a PyTorch checkpoint.

A latent diffusion target (``python -m drc_jax.convert --format=diffusers-ldm``) loads as a
``LatentTarget``: ``apply(z, t)`` runs on latents, and its VQ autoencoder gives

  z = target.encode(x)   # x [B, H, W, 3] in [-1, 1] -> [B, h, w, c]: diffusers vq.encode(x).latents
  x = target.decode(z)   # [B, h, w, c] -> [B, H, W, 3]: vq.decode(z).sample (quantises first)

neither of which scales: the UNet was trained on ``target.scaling_factor * encode(x)``, and
``LDMPipeline`` decodes ``z / scaling_factor``. ``target.is_latent`` tells the two kinds apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from drc_jax.core import schedule as schedule_lib
from drc_jax.models import unet as model_lib
from drc_jax.models import vq as vq_lib
from drc_jax.targets import checkpoints, sd, sd_random, shipped


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

  @property
  def is_latent(self) -> bool:
    """False: the model runs on images (see ``LatentTarget``)."""
    return False


@dataclasses.dataclass(frozen=True)
class LatentTarget(Target):
  """A latent diffusion target: the UNet on latents plus its VQ autoencoder.

  Attributes (beyond Target's):
    autoencoder: the VQ autoencoder as (config, graphdef) with pure ``encode``/``decode``.
    autoencoder_params: its parameters (jax arrays).
    latent: model.json's latent section (``checkpoints.LATENT_KEYS``).
  """

  autoencoder: vq_lib.Autoencoder = None
  autoencoder_params: Any = None
  latent: dict[str, Any] = dataclasses.field(default_factory=dict)
  _encode_fn: Callable[..., jax.Array] = dataclasses.field(default=None, repr=False, compare=False)
  _decode_fn: Callable[..., jax.Array] = dataclasses.field(default=None, repr=False, compare=False)

  @classmethod
  def create_latent(
    cls, target: Target, autoencoder: vq_lib.Autoencoder, params, latent: dict[str, Any]
  ) -> LatentTarget:
    """The latent target of a UNet ``target`` and its autoencoder."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(Target)}
    return cls(
      **fields,
      autoencoder=autoencoder,
      autoencoder_params=params,
      latent=dict(latent),
      _encode_fn=jax.jit(autoencoder.encode),
      _decode_fn=jax.jit(autoencoder.decode),
    )

  @property
  def is_latent(self) -> bool:
    return True

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """[h, w, c] of the latents the UNet runs on."""
    return tuple(self.latent['latent_shape'])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """[H, W, C] of the images the autoencoder encodes and decodes."""
    return tuple(self.latent['image_shape'])

  @property
  def scaling_factor(self) -> float:
    """The UNet sees ``scaling_factor * encode(x)``; ``decode`` takes ``z / scaling_factor``."""
    return float(self.latent['scaling_factor'])

  @property
  def downsampling_factor(self) -> int:
    return int(self.latent['downsampling_factor'])

  def encode(self, x) -> jax.Array:
    """Latents of images: diffusers ``vq.encode(x).latents`` (before quantisation, unscaled).

    Args:
      x: [B, H, W, C] float images in [-1, 1] (NHWC), H and W multiples of the factor.

    Returns:
      [B, H/f, W/f, c] float32 latents.
    """
    x = jnp.asarray(x, jnp.float32)
    f, c = self.downsampling_factor, self.autoencoder.config.in_channels
    if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'x must be [B, H, W, {c}] (NHWC) with H, W multiples of {f}, got {x.shape}')
    return self._encode_fn(self.autoencoder_params, x)

  def decode(self, z) -> jax.Array:
    """Images of latents: diffusers ``vq.decode(z).sample`` (nearest codebook vectors first).

    Args:
      z: [B, h, w, c] float latents, unscaled (divide the UNet's latents by scaling_factor).

    Returns:
      [B, h*f, w*f, C] float32 images (about [-1, 1], not clipped).
    """
    z = jnp.asarray(z, jnp.float32)
    c = self.latent_shape[-1]
    if z.ndim != 4 or z.shape[-1] != c:
      raise ValueError(f'z must be [B, h, w, {c}] (NHWC), got {z.shape}')
    return self._decode_fn(self.autoencoder_params, z)


def _with_autoencoder(workdir: epath.Path, target: Target) -> Target:
  """``target`` as a LatentTarget when ``model.json`` has a latent section, else unchanged."""
  latent = checkpoints.latent_of(workdir)
  if latent is None:
    return target
  autoencoder, params = checkpoints.load_autoencoder(workdir / latent['autoencoder'])
  path = workdir / checkpoints.MODEL_JSON
  want = tuple(latent['latent_shape'])
  have = (target.config.resolution, target.config.resolution, target.config.in_channels)
  if have != want or autoencoder.config.vq_embed_dim != want[-1]:
    raise checkpoints.CheckpointError(
      f'{path}: latent_shape {list(want)} does not match the UNet ({list(have)}) or the '
      f'autoencoder (latent width {autoencoder.config.vq_embed_dim})'
    )
  bad = [k for k, v in model_lib.flat_params(params).items() if not np.all(np.isfinite(v))]
  if bad:
    raise checkpoints.CheckpointError(f'{workdir}: non-finite autoencoder weights in {bad[:5]}')
  return LatentTarget.create_latent(target, autoencoder, params, latent)


def _restore_step(workdir: epath.Path, step_dir: epath.Path) -> Target:
  """A Target from one checkpoint step directory ``workdir/checkpoints/<step>``."""
  unet_cfg, diffusion = checkpoints.load_model_json(workdir)
  model, abstract = model_lib.abstract_model(unet_cfg)
  params = jax.tree_util.tree_map(np.asarray, checkpoints.restore_ema(step_dir, abstract))
  bad = [k for k, v in model_lib.flat_params(params).items() if not np.all(np.isfinite(v))]
  if bad:
    raise checkpoints.CheckpointError(f'{step_dir}: non-finite weights in {bad[:5]}')
  target = Target.create(model, params, checkpoints.schedule_from(diffusion), int(step_dir.name))
  return _with_autoencoder(workdir, target)


def _load_weights_dir(path: epath.Path) -> Target:
  """A Target from a safetensors directory (a shipped target), its hashes checked first."""
  shipped.verify(path)
  unet_cfg, diffusion = checkpoints.load_model_json(path)
  model, abstract = model_lib.abstract_model(unet_cfg)
  params = shipped.load_params(path, abstract)
  step = int(json.loads((path / checkpoints.MODEL_JSON).read_text()).get('step', 0))
  return Target.create(model, params, checkpoints.schedule_from(diffusion), step)


# Randomly initialised targets for smoke runs (``:runlocal``): 'random:<name>' in place of a path.
RANDOM_PREFIX = 'random:'


RANDOM_TARGETS = ('ldm-tiny', *sd_random.RANDOM_TARGETS)


def random_target(name: str, seed: int = 0) -> Target | sd.SDTarget:
  """A seeded random target built in memory: 'ldm-tiny' is a latent diffusion target (a two-level
  VQ autoencoder, factor 4, on 32x32x3 images; a multi-head UNet on its 8x8x3 latents; the CompVis
  LDM schedule); 'sd-tiny' and 'sd-tiny-inpaint' are tiny Stable Diffusion targets
  (``sd_random.random_parts``: 32x32x3 images, 8x8x4 latents, a CLIP text tower; the second with a
  9-channel inpainting UNet). Their scores mean nothing; they run every latent code path."""
  if name in sd_random.RANDOM_TARGETS:
    return sd_random.random_target(name, seed, jax.jit)
  if name != 'ldm-tiny':
    raise checkpoints.CheckpointError(
      f'{RANDOM_PREFIX}{name}: unknown random target (one of {", ".join(RANDOM_TARGETS)})'
    )
  vq_cfg = vq_lib.VQConfig(
    block_out_channels=(32, 64, 64),
    down_block_types=('DownEncoderBlock2D',) * 3,
    up_block_types=('UpDecoderBlock2D',) * 3,
    latent_channels=3,
    vq_embed_dim=3,
    num_vq_embeddings=64,
    norm_num_groups=8,
  )
  unet_cfg = model_lib.UNetConfig(
    resolution=8,
    in_channels=3,
    out_channels=3,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_res=(4,),
    dropout=0.0,
    norm_groups=8,
    attn_head_dim=16,
  )
  model, params = model_lib.DiffusionModel.create(unet_cfg, seed=seed)
  autoencoder, vq_params = vq_lib.Autoencoder.create(vq_cfg, seed=seed + 1)
  schedule = schedule_lib.NoiseSchedule.create(
    'scaled_linear', 1000, beta_start=0.0015, beta_end=0.0195
  )
  latent = {
    'autoencoder': '',
    'latent_shape': [8, 8, 3],
    'image_shape': [32, 32, 3],
    'downsampling_factor': 4,
    'scaling_factor': 1.0,
  }
  return LatentTarget.create_latent(
    Target.create(model, params, schedule), autoencoder, vq_params, latent
  )


def target_files(path) -> list[epath.Path]:
  """The files ``load_target(path)`` reads its model from: ``model.json``, the weights (a
  safetensors directory's ``ema.safetensors``; a workdir's latest checkpoint step, every file) and
  a latent target's autoencoder folder. Equal files mean an equal target, so a saved digest of
  them (``audit.store``) spares loading the model to check it. A Stable Diffusion workdir:
  ``model.json`` and the files it records (weights, tokenizer). A random target: none.

  Raises:
    checkpoints.CheckpointError: ``path`` is not a target (as ``load_target``).
  """
  if str(path).startswith(RANDOM_PREFIX):
    return []
  path = epath.Path(shipped.resolve(path))
  if sd.is_sd_workdir(path):
    return sd.target_files(path)
  if shipped.is_weights_dir(path):
    root, weights = path, [path / shipped.WEIGHTS]
  elif (path / checkpoints.MODEL_JSON).exists():
    # the latest finished step (orbax renames a step's folder to its number once written); no
    # CheckpointManager: it synchronises every process, and only one process calls this
    ckpt_dir = path / checkpoints.CHECKPOINT_DIR
    steps = (
      [int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()] if ckpt_dir.is_dir() else []
    )
    step = max(steps) if steps else None
    if step is None:
      raise checkpoints.CheckpointError(f'{path / checkpoints.CHECKPOINT_DIR}: no checkpoint found')
    root, weights = path, [path / checkpoints.CHECKPOINT_DIR / str(step)]
  elif path.name.isdigit() and path.parent.name == checkpoints.CHECKPOINT_DIR:
    root, weights = path.parent.parent, [path]
  elif path.name == checkpoints.CHECKPOINT_DIR:
    return target_files(path.parent)
  else:
    raise checkpoints.CheckpointError(f'{path} is not a drc_jax target')
  out = [root / checkpoints.MODEL_JSON]
  for top in [*weights, root / checkpoints.AUTOENCODER_DIR]:
    if top.is_dir():
      out += sorted(epath.Path(d) / f for d, _, files in os.walk(str(top)) for f in files)
    elif top.exists():
      out.append(top)
  return out


def load_target(path) -> Target:
  """Loads a target model for auditing.

  Args:
    path: a drc_jax workdir (``model.json`` + ``checkpoints/``; its latest step is used), its
      ``checkpoints`` folder, one step directory ``W/checkpoints/<step>``, a safetensors target
      directory (``model.json`` + ``ema.safetensors``), or ``shipped:<name>`` (a target shipped
      inside drc_jax, e.g. ``shipped:fashion_mnist``).

  Returns:
    The Target: ``.apply(x, t)`` (jitted), ``.config``, ``.params``, ``.schedule``, ``.model``;
    for a latent diffusion target a LatentTarget, which adds ``.encode(x)``, ``.decode(z)``,
    ``.latent_shape``, ``.scaling_factor`` (``.is_latent`` is True); for a Stable Diffusion
    workdir (``--format=diffusers-sd``) a ``targets.sd.SDTarget`` (``tokenize``,
    ``encode_text``, ``apply(z, t, context)``, ``encode``, ``decode``).

  Raises:
    checkpoints.CheckpointError: ``path`` is none of these, or its checkpoint does not match
      ``model.json`` (the message names the keys).
  """
  if str(path).startswith(RANDOM_PREFIX):
    return random_target(str(path)[len(RANDOM_PREFIX) :])
  path = epath.Path(shipped.resolve(path))
  if sd.is_sd_workdir(path):
    return sd.load(path, jax.jit)
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
