"""The audit: score members and non-members with every attack, resumably, then the results.

``make_scorer`` is the audit's program boundary: it jits, once and sharded over the mesh, the
batch program of every attack (and DRC's evidence and the target's sampler for the results).
``score_images`` runs it over the split, shard by shard, into the score store (``store.py``);
``results.write_results`` turns the saved scores into metrics and the report.

All processes compute every batch (each its slice); only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from drc_jax.attacks import conditional as text_attacks
from drc_jax.attacks import registry as attacks_lib
from drc_jax.audit import results, store, validate
from drc_jax.audit import samples as samples_lib
from drc_jax.core import export_cache, parallel, progress
from drc_jax.data import captions as captions_lib
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib
from drc_jax.drc import faces
from drc_jax.models import latent as latent_lib
from drc_jax.targets import checkpoints, shipped
from drc_jax.targets import encoders as encoders_lib
from drc_jax.targets import load as target_lib


def _items(split: splits_lib.SplitManifest, max_images: int) -> tuple[np.ndarray, np.ndarray]:
  """(is_member int8 [N], dataset index int64 [N]): members first, then non-members."""
  mem, non = split.members, split.nonmembers
  if max_images:
    mem, non = mem[:max_images], non[:max_images]
  if len(mem) < 2 or len(non) < 2:
    raise data_lib.DataError(
      f'split of {split.dataset or "the audit"}: {len(mem)} members and {len(non)} non-members '
      f'to audit (config.audit.max_images={max_images}); the calibrated decision needs at '
      f'least 2 of each'
    )
  return (
    np.concatenate([np.ones(len(mem), np.int8), np.zeros(len(non), np.int8)]),
    np.concatenate([mem, non]),
  )


class AuditedTarget:
  """The audited model: EMA params replicated on the mesh, with its schedule and identity."""

  def __init__(self, config, workdir: str, mesh):
    path = shipped.resolve(config.audit.checkpoint) if config.audit.checkpoint else workdir
    target = target_lib.load_target(path)  # a workdir or one step directory W/checkpoints/N
    self.schedule, self.step = target.schedule, target.step
    self.is_text_conditioned = bool(getattr(target, 'is_text_conditioned', False))
    if self.is_text_conditioned != captions_lib.is_text_conditioned(config):
      raise validate.ConfigError(
        f'the target in {path} is {"" if self.is_text_conditioned else "not "}text-conditioned '
        f'but config.text.captions is {config.text.captions!r}: '
        + (
          "set it ('class_template' or 'file') so each image is audited under its caption"
          if self.is_text_conditioned
          else "set it to '' for an unconditional target"
        )
      )
    if self.is_text_conditioned:  # SDTarget: the UNet, autoencoder and text tower as one
      self.model = target
      h = w = config.data.resolution
      c = target.image_channels
      f = target.downsampling_factor * target.unet.config.downsampling_factor
      if h % f:
        raise validate.ConfigError(
          f'config.data.resolution: {h} is not a multiple of {f}, the factor the target in '
          f'{path} downsamples by (autoencoder x UNet)'
        )
    elif target.is_latent:  # the UNet on latents and its autoencoder, params {'unet', 'vq'}
      self.model = latent_lib.from_target(target)[0]
      h, w, c = self.model.image_shape
    else:
      self.model = target.model
      h = w = self.model.config.resolution
      c = self.model.config.in_channels
    params = store.audited_params(target)
    res = config.data.resolution
    if (h, w, c) != (res, res, config.data.channels):
      raise validate.ConfigError(
        f'the target in {path} takes {h}x{w}x{c} images but config.data asks for '
        f'{res}x{res}x{config.data.channels}'
      )
    validate.check_timesteps(
      config, self.schedule.num_timesteps, f'num_timesteps of the target in {path}'
    )
    self.ema_sha256 = checkpoints.tree_sha256(params)  # part of what the scores depend on
    # ... and so is the model as loaded: architecture, noise schedule and latent section (an
    # edited model.json changes them without changing a weight)
    self.description_sha256 = store.description_sha256(target)
    random = str(path).startswith(target_lib.RANDOM_PREFIX)
    self.workdir = epath.Path(path) if random else checkpoints.workdir_of(path)
    self.trained_on = None if random else checkpoints.trained_on(self.workdir)
    self.params = parallel.replicate(mesh, params)
    self.path = path


@dataclasses.dataclass
class Scorer:
  """What an audit runs, built once per run: the target on the mesh and its jitted programs.

  Attributes:
    score_fn: every attack on one batch,
      ``(params, aux, {name: key_data}, images, side) -> {name: scores}``.
    evidence_fn: DRC's degraded and restored images of all K restorations,
      ``(params, key_data, images, aux, side) -> ([B, K, H, W, C], [B, K, H, W, C])`` (None
      without DRC).
    sample_fn: the target's DDIM samples, ``(params, key_data) -> [B, H, W, C]``.
  """

  target: AuditedTarget
  mesh: Any
  names: list[str]
  attacks: dict[str, attacks_lib.Attack]
  score_fn: Callable
  evidence_fn: Callable | None
  sample_fn: Callable
  aux: Any  # the attacks' extra params (DRC's encoders), replicated: {name: params}
  side_fn: Callable  # (source, indices) -> per-image host inputs of a batch (DRC's face masks)


def make_scorer(config, workdir: str) -> Scorer:
  """The target of ``workdir`` (or ``audit.checkpoint``) and the audit's programs, each jitted
  once with its shardings (params replicated, batches split over the 'data' axis)."""
  names = validate.attack_names(config)
  mesh = parallel.make_mesh()
  target = AuditedTarget(config, workdir, mesh)
  encoders = load_drc_encoders(config)
  if target.is_text_conditioned:
    if encoders:
      raise validate.ConfigError(
        'config.drc: a text-conditioned target is audited with pixel comparators and random, '
        'central or given masks (no DRC encoder yet)'
      )
    attacks = text_attacks.make_text_attacks(config, target.model, names)
  else:
    attacks = attacks_lib.make_attacks(config, target.model, target.schedule, names, encoders)
  for a in attacks.values():
    calls = ''.join(f', {n} {r} encoder calls' for r, n in a.encoder_calls.items())
    logging.info('attack %-6s %5d model calls per image%s', a.name, a.nfe, calls)
  aux = parallel.replicate(mesh, attacks_lib.aux_params(attacks))
  # What the programs' closures depend on: a repeat run loads their lowered form (export_cache).
  key = json.dumps(
    {
      'config': config.to_dict(),
      'description_sha256': target.description_sha256,
      'encoders': store.encoder_digests(config),
    },
    sort_keys=True,
    default=list,
  )

  def program(fn, what: str, batch_arg: int):
    """``fn`` jitted, kept lowered on disk, logging a line before it compiles (the first batch
    is silent for long)."""
    return progress.announce_compiles(export_cache.Exported(fn, what, key), what, batch_arg)

  text = target.is_text_conditioned
  if text:  # each batch's captions encoded once by the target's text tower, in the program
    batch_scorer = text_attacks.make_text_batch_scorer(attacks, target.model)
  else:
    batch_scorer = attacks_lib.make_batch_scorer(attacks)
  score_fn = program(
    jax.jit(batch_scorer, **parallel.shardings(mesh, 'rrddd', 'd')),
    f'scorer of {", ".join(names)}',
    3,
  )
  evidence_fn = None
  if 'drc' in attacks:  # the DRC attack's own scorer: the same restorations as its scores
    evidence = attacks['drc'].evidence
    if text:
      evidence = text_attacks.text_evidence(attacks['drc'], target.model)
    evidence_fn = program(
      jax.jit(evidence, **parallel.shardings(mesh, 'rddrd', 'dd')),
      'DRC evidence program',
      2,
    )
  if text:
    shape = (config.data.resolution, config.data.resolution, config.data.channels)
    sampler = samples_lib.make_text_sampler(target.model, shape)
  else:
    sampler = samples_lib.make_sampler(target.model, target.schedule)
  sample_fn = program(jax.jit(sampler), "target's sampler", 1)
  side_fn = make_side_fn(config, names, target.model if text else None)
  return Scorer(target, mesh, names, attacks, score_fn, evidence_fn, sample_fn, aux, side_fn)


def load_drc_encoders(config) -> dict[str, Any]:
  """DRC's encoders by role ('saliency', 'compare'), loaded from the config's directories."""
  return {
    role: encoders_lib.load_encoder(config.drc[field])
    for role, field in validate.drc_encoder_fields(config).items()
  }


def make_side_fn(config, names: list[str], text_target=None) -> Callable:
  """``side(source, indices) -> (inputs, found)``: the per-image host inputs of a batch.

  For ``drc.mask='face'``: ``{'keep_mask': [B, R, R, 1]}`` from MTCNN on the raw images (read
  through the run cache) and ``found`` [B] (False: no face, the centre box stands in); otherwise
  ``({}, None)``. For a text-conditioned target (``text_target``) also each image's caption as
  token ids (``'ids'``; ``'clid_ids'``: CLiD's degraded captions), encoded in the program.
  """
  if text_target is not None:
    captions = captions_lib.Captions(config)
    clid = 'clid' in names and text_attacks.clid_weakens_captions(config)
    inner = make_side_fn(config, names)

    def with_captions(source, indices):
      side, found = inner(source, indices)
      texts = captions(source, indices)
      return {**side, **text_attacks.text_inputs(text_target, texts, clid)}, found

    return with_captions
  if 'drc' not in names or config.drc.mask != 'face':
    return lambda source, indices: ({}, None)
  path = config.drc.face_detector or None
  detector = faces.Detector.load(path) if path else faces.default_detector()

  def side(source, indices):
    raw, _ = source.read(indices)
    masks, found = faces.drc_keep_masks(raw, config.data, config.drc.mask_ratio, detector)
    return {'keep_mask': masks}, found

  return side


def score_split(
  config, workdir: str, overwrite: bool = False
) -> tuple[Scorer, data_lib.ImageSource]:
  """Scores every image of the split not yet scored (into ``W/scores``); the audit's first half.

  Every input is validated before the first file changes: the config, the target (checkpoint,
  integrity, schedule, image size), the data source, the split and the data the target was
  trained on; only then ``store.check_workdir`` refuses or (``overwrite``) moves old results aside.
  """
  validate.check(config)  # at once when the caller (run_audit, dataset inference) checked it
  scorer = make_scorer(config, workdir)
  target = scorer.target
  source = data_lib.CachedSource(splits_lib.run_source(config))  # each image read once
  split = splits_lib.resolve(config.split, source, workdir, write=False)
  if target.trained_on is None:
    logging.info(
      'the target in %s records no training data (imported, or trained by an older '
      'drc_jax): its members are not checked against the split',
      target.workdir,
    )
  splits_lib.check_trained_on(
    target.trained_on,
    splits_lib.training_data(config, source, split),
    str(target.workdir / checkpoints.MODEL_JSON),
  )
  is_member, indices = _items(split, config.audit.max_images)
  data_lib.load_images(source, indices[:1], config.data)  # the preprocessing settings work
  store.check_workdir(config, workdir, overwrite, target)
  if parallel.is_writer():
    splits_lib.write_to_workdir(split, workdir)
  score_images(config, workdir, scorer, source, is_member, indices)
  return scorer, source


def run_audit(config, workdir: str, overwrite: bool = False) -> dict:
  """Scores every image not yet scored, then writes metrics and the report. Returns metrics."""
  scorer, source = score_split(config, workdir, overwrite)
  return results.write_results(config, workdir, scorer, source)


def score_images(
  config,
  workdir: str,
  scorer: Scorer,
  source: data_lib.ImageSource,
  is_member: np.ndarray,
  indices: np.ndarray,
  key_indices: np.ndarray | None = None,
) -> None:
  """Scores ``source`` images at ``indices`` into shards ``workdir/scores``, skipping whole shards.

  Args:
    config: the run config.
    workdir: where the ``scores/`` folder is.
    scorer: from ``make_scorer``.
    source: the images.
    is_member: int8 [N], the ``split`` column (1 member, 0 non-member, -1 unknown).
    indices: int64 [N], indices into ``source``, in shard order.
    key_indices: int64 [N], what each image's attack keys are derived from (default ``indices``).
  """
  names, target = scorer.names, scorer.target
  key_indices = indices if key_indices is None else key_indices
  shard, bs = config.audit.shard_size, config.audit.batch_size
  n_shards = -(-len(indices) // shard)
  fingerprint = store.fingerprint_digest(store.fingerprint(config, target))
  done = set()
  for i in range(n_shards):
    path = store.shard_path(workdir, i)
    problem = store.shard_problem(path, fingerprint) if path.exists() else 'missing'
    if problem is None:
      done.add(i)
    elif problem != 'missing':
      logging.warning('%s; scoring it again', problem)
  parallel.sync('shards_listed')  # every process decides the same shards to skip
  todo = [i for i in range(n_shards) if i not in done]
  logging.info(
    '%d images in %d shards: %d done, %d to score', len(indices), n_shards, len(done), len(todo)
  )
  p_idx, p_cnt = jax.process_index(), jax.process_count()
  total = sum(min(shard, len(indices) - i * shard) for i in todo)
  # A bar on a terminal, a line at least every 10 s in a log; the time left leaves out the first
  # batch (compilation).
  bar = progress.Progress('scoring', total, 'images')
  for i in todo:
    lo, hi = i * shard, min((i + 1) * shard, len(indices))
    rows: dict[str, list] = {}
    labels = np.zeros(hi - lo, np.int64)
    hashes: list[str | None] = [None] * (hi - lo)
    faces_found = np.ones(hi - lo, bool)
    for slot in data_lib.batch_slots(hi - lo, bs, p_idx, p_cnt):
      pos = np.where(slot.valid, lo + slot.positions, lo)  # padding repeats the shard's first
      images, batch_labels, batch_hashes = data_lib.load_images(source, indices[pos], config.data)
      for j in np.flatnonzero(slot.valid):  # this process's rows: labels and hashes as read
        labels[pos[j] - lo], hashes[pos[j] - lo] = batch_labels[j], batch_hashes[j]
      keys = attacks_lib.keys_for(names, config.seed, key_indices[pos])
      side, found = scorer.side_fn(source, indices[pos])
      if found is not None:
        for j in np.flatnonzero(slot.valid):
          faces_found[pos[j] - lo] = found[j]
      out = attacks_lib.score_batch(scorer, keys, images, side, slot.valid)
      for name, v in out.items():
        rows.setdefault(name, []).append(v)
      bar.update(len(next(iter(out.values()))))
    rest = [r for r, h in enumerate(hashes) if h is None]  # rows other processes scored
    if rest:
      raw, rest_labels = source.read(indices[lo:hi][rest])
      labels[rest] = rest_labels
      for r, h in zip(rest, data_lib.image_hashes(raw)):
        hashes[r] = h
      _, found = scorer.side_fn(source, indices[lo:hi][rest])
      if found is not None:
        faces_found[rest] = found
    arrays = {
      'split': is_member[lo:hi],
      'index': indices[lo:hi],
      'label': labels,
      'hash': np.asarray(hashes),
    }
    if config.drc.mask == 'face' and 'drc' in names:
      arrays['drc/face_found'] = faces_found
      if not faces_found.all():
        logging.warning(
          'shard %d: no face found in %d of %d images: DRC removed their centre box instead '
          '(drc/face_found in the shard says which)',
          i,
          int((~faces_found).sum()),
          hi - lo,
        )
    for name, chunks in rows.items():
      v = np.concatenate(chunks).astype(np.float64)
      if name == 'drc':
        arrays['drc/sim'] = v
        arrays['score/drc'] = v.mean(axis=1)
      else:
        arrays[f'score/{name}'] = v
    if len(arrays['score/' + names[0]]) != hi - lo:
      raise RuntimeError(f'shard {i}: scored {len(arrays["score/" + names[0]])} of {hi - lo}')
    if parallel.is_writer():
      store.write_shard(store.shard_path(workdir, i), arrays, fingerprint)
    bar.log('scored shard %d/%d', i + 1, n_shards)
  bar.close()
  parallel.sync('scores_written')
