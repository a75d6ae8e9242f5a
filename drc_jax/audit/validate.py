"""Config validation before any work starts: each error names the field and the allowed values."""

from __future__ import annotations

import math
import os
import re

import jax

from drc_jax.attacks import conditional as text_attacks
from drc_jax.attacks import registry as attacks_lib
from drc_jax.audit import calibration as calibration_lib
from drc_jax.audit import combiners as combiners_lib
from drc_jax.core import errors, streams
from drc_jax.data import captions as captions_lib
from drc_jax.data import splits as splits_lib
from drc_jax.drc import compare as compare_lib
from drc_jax.drc import degrade as degrade_lib
from drc_jax.drc import restore as restore_lib
from drc_jax.drc import scorer as drc_lib
from drc_jax.models import unet as model_lib

# The valid names are the registries the code itself runs from.
RESTORERS = tuple(restore_lib.RESTORERS)
MASKS = tuple(degrade_lib.MASKS) + degrade_lib.GIVEN
DEGRADATIONS_LINEAR = degrade_lib.LINEAR
SALIENCY = degrade_lib.SALIENCY
COMPARATORS = tuple(compare_lib.COMPARATORS) + compare_lib.ENCODER_COMPARATORS
ATTACKS = tuple(attacks_lib.ATTACKS)
TEXT_ONLY_ATTACKS = ('clid',)  # attacks that need each image's caption (config.text.captions)
CAPTION_KINDS = ('', 'class_template', 'file')
SOURCES = ('fashion_mnist', 'tfds', 'folder')
SUSPECT_DRAWS = ('members', 'nonmembers')  # config.dataset.suspect (experiments)
# config.dataset.name: a safe file name (it names the set's folder W/dataset/suspects/<name>)
SET_NAME = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}')


class ConfigError(errors.UserError, ValueError):
  """An invalid config value; the message names the field."""


def _require(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def attack_names(config) -> list[str]:
  names = [n.strip() for n in config.attacks.names.split(',') if n.strip()]
  text = captions_lib.is_text_conditioned(config)
  known = ATTACKS + TEXT_ONLY_ATTACKS
  for n in names:
    _require(n in known, f'config.attacks.names: unknown attack {n!r}; known: {known}')
    _require(
      text or n not in TEXT_ONLY_ATTACKS,
      f'config.attacks.names: {n!r} needs captions (set config.text.captions for a '
      f'text-conditioned target)',
    )
  _require(len(set(names)) == len(names), 'config.attacks.names: an attack is listed twice')
  _require(bool(names), 'config.attacks.names: no attack named')
  return names


# Configs already checked in this process, by content (and device count): the entry points a run
# passes through (modes.run, then run_audit / report / dataset inference) each guard themselves,
# and a run validates its config once.
_checked: set[str] = set()


def check(config) -> None:
  """Raises ConfigError on the first invalid field; a config checked before, unchanged, returns at
  once."""
  key = f'{jax.device_count()} {config.to_json_best_effort(sort_keys=True)}'
  if key in _checked:
    return
  _check(config)
  _checked.add(key)


def _check(config) -> None:
  d, n_dev = config.data, jax.device_count()
  _require(d.source in SOURCES, f'config.data.source: {d.source!r} not in {SOURCES}')
  _require(d.channels in (1, 3), f'config.data.channels: {d.channels} (expected 1 or 3)')
  _require(d.resolution >= 8, f'config.data.resolution: {d.resolution} is below 8')
  try:
    model_lib.unet_config_from(config.model, d.resolution, d.channels)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model: {e}') from e
  T = config.diffusion.num_timesteps
  _require(T >= 2, f'config.diffusion.num_timesteps: {T} (expected >= 2)')
  _require(
    config.diffusion.beta_schedule in ('linear', 'scaled_linear', 'cosine'),
    f'config.diffusion.beta_schedule: {config.diffusion.beta_schedule!r}',
  )
  if config.diffusion.beta_schedule != 'cosine':
    lo, hi = config.diffusion.beta_start, config.diffusion.beta_end
    for name, v in (('beta_start', lo), ('beta_end', hi)):
      _require(
        isinstance(v, (int, float)) and math.isfinite(v) and 0.0 < v < 1.0,
        f'config.diffusion.{name}: {v} not in (0, 1)',
      )
    _require(lo <= hi, f'config.diffusion.beta_start ({lo}) exceeds beta_end ({hi})')
  _check_sizes(config)
  try:  # folder pair, class pair: complete, not contradicting each other or split.file
    splits_lib.check_fields(config.split)
  except errors.UserError as e:
    raise ConfigError(str(e)) from e
  for field in ('train.batch_size', 'audit.batch_size'):
    section, name = field.split('.')
    bs = config[section][name]
    _require(
      bs > 0 and bs % n_dev == 0,
      f'config.{field}: {bs} is not a positive multiple of the {n_dev} devices',
    )
  _require(
    config.audit.shard_size > 0,
    f'config.audit.shard_size: {config.audit.shard_size} (expected > 0)',
  )
  _require(
    config.audit.shard_size % config.audit.batch_size == 0,
    f'config.audit.shard_size ({config.audit.shard_size}) must be a multiple of '
    f'config.audit.batch_size ({config.audit.batch_size})',
  )
  _require(
    0.0 < config.audit.calibration_fraction < 1.0,
    f'config.audit.calibration_fraction: {config.audit.calibration_fraction} not in (0, 1)',
  )
  _check_calibration(config.audit)
  check_dataset(config)
  r = config.drc
  _require(r.restorer in RESTORERS, f'config.drc.restorer: {r.restorer!r} not in {RESTORERS}')
  _require(
    r.mask in MASKS + DEGRADATIONS_LINEAR,
    f'config.drc.mask: {r.mask!r} not in {MASKS + DEGRADATIONS_LINEAR}',
  )
  if r.mask in DEGRADATIONS_LINEAR:
    _require(
      r.restorer == 'ddnm',
      f"config.drc.mask={r.mask!r} is a linear degradation: it needs config.drc.restorer='ddnm'",
    )
  _require(0.0 < r.mask_ratio < 1.0, f'config.drc.mask_ratio: {r.mask_ratio} not in (0, 1)')
  _require(
    r.comparator in COMPARATORS, f'config.drc.comparator: {r.comparator!r} not in {COMPARATORS}'
  )
  _require(r.saliency in SALIENCY, f'config.drc.saliency: {r.saliency!r} not in {SALIENCY}')
  _require(
    r.restorations in ('scan', 'batch'),
    f"config.drc.restorations: {r.restorations!r} not in ('scan', 'batch')",
  )
  check_drc_encoders(config)
  _require(r.num_restorations >= 1, 'config.drc.num_restorations must be >= 1')
  _require(r.eta >= 0.0, f'config.drc.eta: {r.eta} < 0')
  _require(
    0.0 <= r.vote_quantile <= 1.0, f'config.drc.vote_quantile: {r.vote_quantile} not in [0, 1]'
  )
  _require(
    r.get('aggregation', 'mean') in drc_lib.AGGREGATIONS,
    f'config.drc.aggregation: {r.get("aggregation")!r} not in {drc_lib.AGGREGATIONS}',
  )
  if r.mask in ('random_patches', 'saliency_patches'):
    _require(
      r.patch_size >= 1 and d.resolution % r.patch_size == 0,
      f'config.drc.patch_size: {r.patch_size} does not divide config.data.resolution '
      f'{d.resolution}',
    )
  if r.restorer == 'repaint':
    _require(
      r.jump_length >= 1 and r.jump_n_sample >= 1,
      'config.drc.jump_length and jump_n_sample must be >= 1',
    )
  # RePaint repeats each step at most jump_n_sample times; every step needs its own stream number.
  _require(
    r.steps * max(r.jump_n_sample, 1) < streams.MAX_STEPS,
    f'config.drc.steps x jump_n_sample must stay below {streams.MAX_STEPS}',
  )
  attack_names(config)
  _check_text(config)
  _require(config.attacks.pia_p > 0, f'config.attacks.pia_p: {config.attacks.pia_p} (expected > 0)')
  check_timesteps(config, T, 'config.diffusion.num_timesteps', names=ATTACKS)
  au, t = config.audit, config.train
  _require(
    au.max_images >= 0,
    f'config.audit.max_images: {au.max_images} (expected >= 0; 0 audits every image)',
  )
  _require(au.bootstrap >= 0, f'config.audit.bootstrap: {au.bootstrap} (expected >= 0)')
  _require(au.num_evidence >= 0, f'config.audit.num_evidence: {au.num_evidence} (expected >= 0)')
  for name in ('steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    _require(t[name] >= 1, f'config.train.{name}: {t[name]} (expected >= 1)')
  _require(t.warmup_steps >= 0, f'config.train.warmup_steps: {t.warmup_steps} (expected >= 0)')


def _check_text(config) -> None:
  t = config.get('text')
  if t is None:
    return
  _require(
    t.captions in CAPTION_KINDS, f'config.text.captions: {t.captions!r} not in {CAPTION_KINDS}'
  )
  for f in ('guidance_scale', 'attack_guidance_scale'):
    v = t[f]
    _require(
      isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
      f'config.text.{f}: {v} (expected a finite number >= 0; 1 = no guidance)',
    )
  _require(
    0.0 <= t.caption_dropout < 1.0,
    f'config.text.caption_dropout: {t.caption_dropout} not in [0, 1)',
  )
  _require(
    t.clid_captions in ('thirds', 'none'),
    f"config.text.clid_captions: {t.clid_captions!r} not in ('thirds', 'none')",
  )
  if t.captions == 'class_template':
    try:
      t.template.format('x')
    except (IndexError, KeyError, ValueError) as e:
      raise ConfigError(f'config.text.template: {t.template!r} is not a template ({e})') from e


# Size-like fields and their bounds: each sets how much memory or time a run takes, so a slip
# (bootstrap=1e9) is refused before any work rather than running unbounded.
SIZE_BOUNDS = {
  'split.num_members': (1, 10**8),
  'split.num_nonmembers': (1, 10**8),
  'train.steps': (1, 10**8),
  'train.batch_size': (1, 1 << 16),
  'audit.batch_size': (1, 1 << 16),
  'audit.shard_size': (1, 1 << 20),
  'audit.max_images': (0, 10**8),
  'audit.bootstrap': (0, 100_000),
  'audit.num_evidence': (0, 100),
  'audit.num_samples': (0, 100_000),
  'drc.num_restorations': (1, 1000),
  'drc.steps': (1, 100_000),
  'dataset.size': (1, 10**8),
  'dataset.power_repetitions': (0, 100_000),
}


def _check_sizes(config) -> None:
  for field, (lo, hi) in SIZE_BOUNDS.items():
    section, name = field.split('.')
    v = config[section][name]
    _require(
      isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
      f'config.{field}: {v!r} (expected an integer in [{lo:,}, {hi:,}])',
    )


def drc_encoder_fields(config) -> dict[str, str]:
  """The encoder directories DRC needs, by role: {'saliency': field, 'compare': field}."""
  r, out = config.drc, {}
  if 'drc' not in attack_names(config):
    return out
  if r.mask == 'saliency_patches' and r.saliency == 'dino':
    out['saliency'] = 'saliency_encoder'
  if r.comparator in compare_lib.ENCODER_COMPARATORS:
    out['compare'] = 'compare_encoder'
  return out


def check_drc_encoders(config) -> None:
  """Each encoder the DRC setting needs is given (a directory with encoder.json); a missing path
  is an error naming the field."""
  r = config.drc
  for role, field in drc_encoder_fields(config).items():
    path = r[field]
    why = {
      'saliency': "config.drc.saliency='dino' needs a ViT encoder",
      'compare': f'config.drc.comparator={r.comparator!r} needs an encoder',
    }[role]
    _require(
      bool(path),
      f'config.drc.{field} is empty: {why} (convert one: python -m drc_jax.convert '
      f'--format=timm-vit|open-clip|hf-clip|facenet --src=WEIGHTS --out=DIR)',
    )
    _require(
      os.path.exists(os.path.join(path, 'encoder.json'))
      or '://' in path
      or path.startswith('random:'),
      f'config.drc.{field}: {path} holds no encoder.json (not an encoder directory)',
    )


def check_timesteps(config, T: int, where: str, names=None) -> None:
  """Checks the timesteps of the attacks ``names`` (default: those configured) against T steps.

  The schedule is the config's when it is checked alone, the target's own (its ``model.json``)
  when the audit has loaded the target: scores at timesteps the target does not have would be
  computed on a wrapped-around schedule.

  Args:
    config: the run's config.
    T: number of timesteps of the schedule.
    where: where T comes from, for the messages (a config field or a target's model.json).
    names: attacks whose fields to check.

  Raises:
    ConfigError: naming the field, its value, the allowed range and ``where``.
  """
  names = attack_names(config) if names is None else names
  a, r = config.attacks, config.drc
  fields = {'loss': ('loss_t',), 'pia': ('pia_t',), 'pian': ('pia_t',), 'sima': ('sima_t',)}
  if 'clid' in names:
    try:
      ts = text_attacks.config_clid_timesteps(config)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    _require(
      min(ts) >= 0 and max(ts) < T,
      f'config.attacks.clid_t_mid: {a.get("clid_t_mid", text_attacks.CLID_T_MID)} gives CLiD '
      f'timesteps {ts}, not all in [0, {T}) ({where}: {T})',
    )
  for name in names:
    for f in fields.get(name, ()):
      _require(0 <= a[f] < T, f'config.attacks.{f}: {a[f]} not in [0, {T}) ({where}: {T})')
  if 'secmi' in names:
    k, t_sec = a.secmi_k, a.secmi_t
    _require(k >= 1, f'config.attacks.secmi_k: {k} (expected >= 1)')
    _require(
      k <= t_sec < T and t_sec % k == 0,
      f'config.attacks.secmi_t: {t_sec} must be a multiple of secmi_k={k} in [{k}, {T}) '
      f'({where}: {T}); SecMI walks 0, k, ..., t_sec',
    )
  if 'rediffuse' in names:
    k, t_re, n = a.rediffuse_k, a.rediffuse_t, a.rediffuse_n
    _require(k >= 1, f'config.attacks.rediffuse_k: {k} (expected >= 1)')
    _require(
      k <= t_re < T and t_re % k == 0,
      f'config.attacks.rediffuse_t: {t_re} must be a multiple of rediffuse_k={k} in [{k}, {T}) '
      f'({where}: {T}); ReDiffuse denoises t, t - k, ..., 0',
    )
    _require(n >= 1, f'config.attacks.rediffuse_n: {n} (expected >= 1 draws to average)')
  if 'drc' in names:
    if r.restorer != 'repaint':  # RePaint always starts from T (it does not read t_start)
      _require(
        1 <= r.t_start <= T, f'config.drc.t_start: {r.t_start} not in [1, {T}] ({where}: {T})'
      )
    top = T if r.restorer == 'repaint' else min(r.t_start, T)
    _require(
      1 <= r.steps <= top,
      f'config.drc.steps: {r.steps} not in [1, {top}] ({where}: {T}'
      + ('' if r.restorer == 'repaint' else f', config.drc.t_start: {r.t_start}')
      + ')',
    )


def _check_calibration(audit) -> None:
  methods = calibration_lib.METHODS
  _require(
    audit.calibration in methods,
    f'config.audit.calibration: {audit.calibration!r} not in {methods}',
  )
  _require(
    0.0 < audit.calibration_fpr < 1.0,
    f'config.audit.calibration_fpr: {audit.calibration_fpr} not in (0, 1)',
  )
  _require(audit.calibration_l2 >= 0.0, f'config.audit.calibration_l2: {audit.calibration_l2} < 0')


def check_dataset(config, require_suspect: bool = False) -> None:
  """Checks ``config.dataset``; with ``require_suspect`` (``--mode=dataset``), that one suspect set
  is named: a folder (``suspect_dir``) or a draw from the split (``suspect``), not both, and that
  its name (``dataset_name``) is a safe file name."""
  d = config.dataset
  _require(
    d.suspect in ('',) + SUSPECT_DRAWS,
    f'config.dataset.suspect: {d.suspect!r} not in {("",) + SUSPECT_DRAWS}',
  )
  _require(
    d.combiner in combiners_lib.KINDS,
    f'config.dataset.combiner: {d.combiner!r} not in {combiners_lib.KINDS}',
  )
  _require(d.size >= 1, f'config.dataset.size: {d.size} (expected >= 1)')
  _require(0.0 < d.alpha < 0.5, f'config.dataset.alpha: {d.alpha} not in (0, 0.5)')
  sizes = tuple(d.power_sizes)
  _require(
    all(isinstance(n, int) and n >= 1 for n in sizes),
    f'config.dataset.power_sizes: {sizes} (expected integers >= 1)',
  )
  _require(
    d.power_repetitions >= 1,
    f'config.dataset.power_repetitions: {d.power_repetitions} (expected >= 1)',
  )
  if d.name:
    dataset_name(config)
  if not require_suspect:
    return
  _require(
    bool(d.suspect_dir) != bool(d.suspect),
    'config.dataset.suspect_dir and config.dataset.suspect: set exactly one (an image '
    f'folder, or {"|".join(SUSPECT_DRAWS)} to draw config.dataset.size images from the '
    f'split)',
  )
  for field in ('suspect_dir', 'reference_dir'):
    path = d[field]
    _require(not path or os.path.isdir(path), f'config.dataset.{field}: {path} is not a directory')
  dataset_name(config)


def dataset_name(config) -> str:
  """The suspect set's name: ``config.dataset.name``, else the suspect folder's name, else
  ``members-<size>`` / ``nonmembers-<size>`` for a drawn set ('' when no set is named).

  Raises:
    ConfigError: the name is not a safe file name (1-100 letters, digits, '-', '_' or '.', not
      starting with '.'), naming ``config.dataset.name``.
  """
  d = config.dataset
  if d.name:
    name, why = d.name, ''
  elif d.suspect_dir:
    name = os.path.basename(os.path.normpath(d.suspect_dir))
    why = f' (the name of config.dataset.suspect_dir {d.suspect_dir})'
  elif d.suspect:
    name, why = f'{d.suspect}-{d.size}', ''
  else:
    return ''
  _require(
    SET_NAME.fullmatch(name) is not None,
    f'config.dataset.name: {name!r}{why} is not a safe file name (1-100 letters, digits, "-", '
    f'"_" or ".", not starting with "."); set config.dataset.name',
  )
  return name
