"""Trains a text-conditioned target here, on the member split only: a Stable Diffusion-style UNet
(``models/unet_cond.py``) on the images themselves (pixel space, no autoencoder), conditioned on
each member's caption through a frozen, randomly initialised CLIP text tower.

``targets/train.py``'s ``train`` hands a config with a ``text_model`` section
(``default_text_model`` lists and explains its fields) to ``train`` here, with the compiler of its
program boundary. The step is ``train.py``'s (``train_common``): epsilon MSE at uniform t, random
flips, Adam with warm-up and clipping, EMA with warm-up, the batch order of (seed, step) alone, so
a resumed run continues exactly. What differs:

* Captions: each member's caption (``data/captions.py``, ``config.text``; all empty for
  ``config.text.captions=''``) is tokenized by the target's own tokenizer (BPE merges learned from
  ``text_model.tokenizer_corpus``: ``clip_tokenizer.vocabulary_files``) and encoded once per
  distinct caption by the frozen text tower; the empty caption's context once. The step takes
  the table of contexts (row 0: the empty caption) and each example's row.
* Classifier-free guidance training: each example's context is replaced by the empty caption's
  with probability ``config.text.caption_dropout`` (``select_context``).
* The workdir: orbax training states in ``W/checkpoints`` (resume), and at each checkpoint the EMA
  weights written as a Stable Diffusion workdir (``targets/sd.py``: ``unet``, ``text_encoder``,
  the tokenizer, ``model.json`` with ``"vae": null``, ``source: drc_jax``, ``step``,
  ``trained_on`` and ``text_model``), so ``drc_jax.load_target(W)`` is an ``SDTarget`` of the
  latest EMA weights. The SD files are written before the training state, so the target is
  never behind the checkpoint a run resumes from. A workdir whose ``model.json`` records another
  architecture, tokenizer, text tower, schedule or training data is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from drc_jax.core import errors, parallel, progress, streams
from drc_jax.core import schedule as schedule_lib
from drc_jax.data import captions as captions_lib
from drc_jax.data import splits as splits_lib
from drc_jax.models import clip_text, clip_tokenizer, unet_cond
from drc_jax.models import unet as unet_lib
from drc_jax.targets import checkpoints, sd, sd_random, train_common

TEXT_SEED_OFFSET = (
  1  # the text tower is initialised from config.seed + this (the UNet: config.seed)
)


class TextModelError(errors.UserError, ValueError):
  """A ``config.text_model`` this trainer does not build; the message names the field."""


def default_text_model(corpus: str = '') -> ml_collections.ConfigDict:
  """The ``config.text_model`` section of a text-conditioned config (a pixel-space UNet with
  cross-attention and a frozen random text tower), sized for 16x16x1 Fashion-MNIST.

  Every field is part of the target's architecture: a workdir trained with other values is refused
  (``checkpoints.check_config_matches``). The UNet's input and output channels are
  ``config.data.channels``, its side ``config.data.resolution``; its ``cross_attention_dim`` is
  ``text_hidden_size``.
  """
  m = ml_collections.ConfigDict()
  m.block_out_channels = (32, 64)  # UNet channels per level (one downsampling between levels)
  # per level: a cross-attention transformer after each ResNet (here at 8x8 only, as the DDPM's
  # attention: at 16x16 too the step takes 2.3x as long on a CPU for 7% more parameters)
  m.cross_attention = (False, True)
  m.layers_per_block = 1  # ResNets per down level (up levels: one more)
  m.num_heads = 2  # attention heads of every transformer (diffusers' attention_head_dim)
  m.transformer_layers = 1  # transformer blocks per cross-attention layer
  m.norm_num_groups = 8  # GroupNorm groups (divides every block_out_channels)
  m.text_hidden_size = 64  # text tower width D: the context [B, L, D] the UNet attends to
  m.text_layers = 2  # causal pre-LayerNorm layers of the text tower
  m.text_heads = 2  # its attention heads (divides text_hidden_size)
  m.text_intermediate_size = 128  # its MLP width
  m.text_max_length = 16  # tokens per caption with bos and eos (padded, truncated)
  m.tokenizer_corpus = corpus  # text the tokenizer's BPE merges are learned from
  m.tokenizer_merges = 200  # the most merges learned from tokenizer_corpus
  m.vae = ''  # '' = pixel space (the UNet on the images; the only option)
  m.text_trainable = False  # the text tower stays as initialised (False: the only option)
  return m


def _field(m, name: str):
  if name not in m:
    raise TextModelError(f'config.text_model.{name}: missing')
  return m[name]


def section(config) -> dict[str, Any]:
  """``config.text_model`` as JSON values (what ``model.json`` records as ``text_model``)."""
  return json.loads(json.dumps(config.text_model.to_dict(), default=list))


def tokenizer_files(config) -> dict[str, bytes]:
  """The target's tokenizer folder: merges learned from ``text_model.tokenizer_corpus``."""
  m = config.text_model
  length = int(_field(m, 'text_max_length'))
  if not 2 < length <= clip_tokenizer.CONTEXT_LENGTH:
    raise TextModelError(
      f'config.text_model.text_max_length: {length}, expected 3..{clip_tokenizer.CONTEXT_LENGTH}'
    )
  return clip_tokenizer.vocabulary_files(
    str(_field(m, 'tokenizer_corpus')), int(_field(m, 'tokenizer_merges')), length
  )


def unet_config(config) -> unet_cond.UNetCondConfig:
  """The UNet of ``config.text_model`` on ``config.data``'s images."""
  m = config.text_model
  if _field(m, 'vae'):
    raise TextModelError(f"config.text_model.vae: {m.vae!r}; only '' (pixel space) is supported")
  if _field(m, 'text_trainable'):
    raise TextModelError('config.text_model.text_trainable: only False (a frozen text tower)')
  boc = tuple(int(b) for b in _field(m, 'block_out_channels'))
  cross = tuple(bool(c) for c in _field(m, 'cross_attention'))
  if len(cross) != len(boc):
    raise TextModelError(
      f'config.text_model.cross_attention: {len(cross)} values for {len(boc)} levels'
    )
  heads, layers = _field(m, 'num_heads'), _field(m, 'transformer_layers')
  try:
    return unet_cond.UNetCondConfig(
      sample_size=int(config.data.resolution),
      in_channels=int(config.data.channels),
      out_channels=int(config.data.channels),
      block_out_channels=boc,
      layers_per_block=int(_field(m, 'layers_per_block')),
      down_block_types=tuple('CrossAttnDownBlock2D' if c else 'DownBlock2D' for c in cross),
      up_block_types=tuple('CrossAttnUpBlock2D' if c else 'UpBlock2D' for c in cross[::-1]),
      cross_attention_dim=int(_field(m, 'text_hidden_size')),
      num_heads=heads if isinstance(heads, int) else tuple(heads),
      transformer_layers=layers if isinstance(layers, int) else tuple(layers),
      norm_num_groups=int(_field(m, 'norm_num_groups')),
    )
  except ValueError as e:
    raise TextModelError(f'config.text_model: {e}') from e


def text_model(config, files: dict[str, bytes]) -> tuple[clip_text.CLIPTextConfig, Any]:
  """The frozen text tower: (config, params) initialised from ``config.seed``."""
  m = config.text_model
  try:
    return sd_random.text_tower(
      files,
      int(_field(m, 'text_hidden_size')),
      int(_field(m, 'text_layers')),
      int(_field(m, 'text_heads')),
      int(_field(m, 'text_intermediate_size')),
      int(config.seed) + TEXT_SEED_OFFSET,
    )
  except ValueError as e:
    raise TextModelError(f'config.text_model: {e}') from e


def select_context(table, caption_rows, key, dropout: float):
  """Each example's context, the empty caption's with probability ``dropout``.

  Args:
    table: [U + 1, L, D] contexts; row 0 is the empty caption's.
    caption_rows: int [B] rows of ``table``.
    key: the dropout draw's key.
    dropout: the probability of replacing a caption by the empty one.

  Returns:
    ([B, L, D] contexts, bool [B] which were replaced).
  """
  drop = jax.random.bernoulli(key, dropout, caption_rows.shape)  # [B]
  return table[jnp.where(drop, 0, caption_rows)], drop


def make_loss(unet: unet_cond.CondUNet, schedule: schedule_lib.NoiseSchedule, tcfg, dropout: float):
  """``loss(params, images [B,H,W,C], rows int [B], valid [B], table [U+1,L,D], key)``: the
  epsilon MSE at uniform t under each example's context (``select_context``), over valid rows."""

  def loss_fn(params, images, rows, valid, table, key):
    x_t, t, eps, k_drop = train_common.noised_batch(tcfg, schedule, images, key)
    context, _ = select_context(table, rows, k_drop, dropout)
    pred = unet.apply(params, x_t, t, context)
    return train_common.masked_mean_mse(pred, eps, valid)

  return loss_fn


def make_train_step(unet, schedule, tx, config, mesh, compile_fn: Callable):
  """``step(state, images, rows, valid, table, key) -> (state, metrics)``, compiled by
  ``compile_fn`` (``jax.jit``) with the batch sharded and the rest replicated."""
  loss_fn = make_loss(unet, schedule, config.train, float(config.text.caption_dropout))
  step = train_common.make_step(loss_fn, tx, config.train)
  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return compile_fn(
    step,
    in_shardings=(rep, dat, dat, dat, rep, rep),
    out_shardings=(rep, rep),
    donate_argnums=(0,),
  )


def member_captions(config, source, members: np.ndarray) -> list[str]:
  """The members' captions (all empty for an unconditional ``config.text``)."""
  if not captions_lib.is_text_conditioned(config):
    return [''] * len(members)
  return list(captions_lib.make_captioner(config, source)(members))


def context_table(
  text_fn: Callable, tokenizer, captions: list[str], chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
  """The contexts of ``captions``, the text tower run once per distinct caption.

  Args:
    text_fn: int32 [chunk, L] ids -> [chunk, L, D] contexts.
    tokenizer: the target's tokenizer.
    captions: N captions.
    chunk: captions per ``text_fn`` call (the last padded: one compiled shape).

  Returns:
    (float32 [U + 1, L, D]: the empty caption's context, then each distinct caption's in sorted
    order; int32 [N]: each caption's row).
  """
  texts = ['', *sorted(set(captions) - {''})]
  row = {c: i for i, c in enumerate(texts)}
  ids = tokenizer.tokenize(texts)  # [U + 1, L]
  pad = -len(ids) % chunk
  ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
  out = [np.asarray(text_fn(ids[i : i + chunk]), np.float32) for i in range(0, len(ids), chunk)]
  table = np.concatenate(out)[: len(texts)]
  return table, np.asarray([row[c] for c in captions], np.int32)


def _host(tree):
  """A replicated pytree as host arrays (a multi-host array: this process's copy)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _parts(config, unet_cfg, ema, text, files, step: int) -> sd.SDParts:
  return sd.SDParts(
    unet=(unet_cfg, ema),
    vae=None,
    text_encoder=text,
    tokenizer_files=files,
    diffusion={k: config.diffusion[k] for k in sd.DIFFUSION_KEYS if k in config.diffusion},
    prediction_type='epsilon',
    source='drc_jax',
    step=step,
  )


def _description(unet_cfg, text, files, diffusion) -> dict[str, Any]:
  """What a workdir of this target records of it (as JSON values), to compare."""
  doc = {
    'format': sd.FORMAT,
    'vae': None,
    'unet': unet_cfg.to_dict(),
    'text_encoder': dataclasses.asdict(text[0]),
    'diffusion': diffusion,
    'tokenizer': {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())},
    'text_encoder weights': hashlib.sha256(sd.flat_bytes(text[1])).hexdigest(),
  }
  return json.loads(json.dumps(doc))


def check_workdir(workdir, unet_cfg, text, files, config, data_identity) -> bool:
  """Whether ``workdir`` holds this target already (False: none yet).

  Raises:
    CheckpointError: naming ``model.json``: another kind of target, another architecture,
      tokenizer, text tower (its weights: another seed) or schedule.
    DataError: the target was trained on other data (``splits.check_trained_on``).
  """
  path = epath.Path(workdir) / checkpoints.MODEL_JSON
  if not path.exists():
    return False
  doc = checkpoints.read_model_doc(workdir)
  hashes = doc.get('sha256') if isinstance(doc.get('sha256'), dict) else {}
  have = {k: doc.get(k) for k in ('format', 'vae', 'unet', 'text_encoder', 'diffusion')}
  have['tokenizer'] = {n: hashes.get(f'{sd.TOKENIZER_DIR}/{n}') for n in sorted(files)}
  have['text_encoder weights'] = hashes.get(sd.weights_name('text_encoder'))
  want = _description(
    unet_cfg, text, files, _parts(config, unet_cfg, None, text, files, 0).diffusion
  )
  differ = [k for k in want if want[k] != have[k]]
  if differ:
    raise checkpoints.CheckpointError(
      f'{workdir} holds a target of another architecture, tokenizer, text tower or schedule '
      f'({path}: {", ".join(differ)} differ); use another --workdir'
    )
  splits_lib.check_trained_on(doc.get('trained_on'), data_identity, str(path))
  return True


def train(config, workdir: str, compile_fn: Callable) -> train_common.State:
  """Trains (or resumes training) the text-conditioned target in ``workdir`` up to
  ``config.train.steps`` (module docstring); ``compile_fn`` is ``jax.jit`` (``targets/train.py``).
  """
  tcfg = config.train
  mesh, source, split, members, data_identity = train_common.member_data(config, workdir)

  unet_cfg = unet_config(config)
  files = tokenizer_files(config)
  text = text_model(config, files)
  tokenizer = clip_tokenizer.from_files(files, sd.tokenizer_length(text[0]))
  unet, params = unet_cond.CondUNet.create(unet_cfg, seed=config.seed)
  schedule = schedule_lib.make_schedule(config.diffusion)
  tx = train_common.make_optimizer(tcfg)
  extra = {'trained_on': data_identity, 'text_model': section(config)}
  fresh = not check_workdir(workdir, unet_cfg, text, files, config, data_identity)
  if fresh and parallel.is_writer():  # the architecture recorded at once (step 0: initial weights)
    sd.save(workdir, _parts(config, unet_cfg, params, text, files, 0), extra)
  if parallel.is_writer():
    splits_lib.write_to_workdir(split, workdir)

  encoder = clip_text.abstract_text_encoder(text[0])[0]
  text_fn = compile_fn(encoder.encode_text)
  table, rows = context_table(
    lambda ids: text_fn(text[1], ids), tokenizer, member_captions(config, source, split.members)
  )
  logging.info(
    'UNet: %.3fM parameters; %d distinct captions, context %s; caption dropout %.2f',
    unet_lib.count_params(params) / 1e6,
    len(table) - 1,
    table.shape[1:],
    float(config.text.caption_dropout),
  )
  state = train_common.init_state(params, tx)
  mngr = checkpoints.manager(workdir, keep=tcfg.keep_checkpoints)
  if mngr.latest_step() is not None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore(mngr, abstract)
    logging.info('resumed from step %d', int(state['step']))
  state = parallel.replicate(mesh, state)
  table = parallel.replicate(mesh, jnp.asarray(table))
  train_step = progress.announce_compiles(
    make_train_step(unet, schedule, tx, config, mesh, compile_fn), 'text train step', batch_arg=1
  )
  key = jax.random.fold_in(jax.random.key(config.seed), streams.TRAIN)
  n_proc, p_idx = jax.process_count(), jax.process_index()
  local = tcfg.batch_size // n_proc

  def batch_args(step):
    idx = train_common.batch_indices(step, len(members), tcfg.batch_size, config.seed)
    idx = idx[p_idx * local : (p_idx + 1) * local]
    valid = np.ones((local,), bool)
    shard = lambda a: parallel.shard_batch(mesh, a)  # noqa: E731
    return shard(members[idx]), shard(rows[idx]), shard(valid), table, key

  def on_checkpoint(step, state):
    if parallel.is_writer():  # the target first: never behind the state a run resumes from
      sd.save(
        workdir, _parts(config, unet_cfg, _host(state['ema_params']), text, files, step), extra
      )
    checkpoints.save_state(mngr, step, state)

  state = train_common.run_loop(state, train_step, batch_args, tcfg, workdir, on_checkpoint)
  mngr.wait_until_finished()
  mngr.close()
  return state
