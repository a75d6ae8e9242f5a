"""Stable Diffusion targets: a text-conditioned latent diffusion model (UNet, KL autoencoder, CLIP
text tower and tokenizer) as one loaded object, and the workdir that holds it.

  target = drc_jax.load_target('runs/sd2')       # a workdir written by --format=diffusers-sd
  ids = target.tokenize(['a photo of a cat'])    # int32 [B, 77]: transformers' CLIPTokenizer ids
  ctx = target.encode_text(ids)                  # [B, 77, D]: text_encoder(ids).last_hidden_state
  z0 = target.scaling_factor * target.encode(x)  # x [B, H, W, 3] in [-1, 1] -> [B, H/8, W/8, 4]
  out = target.apply(zt, t, ctx)                 # the UNet: epsilon or v (``prediction_type``)
  x = target.decode(z0 / target.scaling_factor)  # [B, h, w, 4] unscaled latents -> [B, H, W, 3]

What each computes, in diffusers terms: ``encode`` is ``vae.encode(x).latent_dist.mean`` (unscaled),
``decode`` is ``vae.decode(z).sample`` (``z`` unscaled), ``apply`` is ``unet(z, t, ctx).sample``
(an inpainting UNet, ``in_channels`` 9, takes the noisy latents, the mask and the masked image's
latents concatenated along channels, as ``StableDiffusionInpaintPipeline`` builds them), and
``encode_text`` is the context ``encode_prompt`` gives the UNet (no ``clip_skip``). Arrays are NHWC.

A pixel-space target (``vae`` None: one trained here by ``targets/train_text.py``) runs its UNet
on the images themselves: ``encode`` and ``decode`` are the identity, ``downsampling_factor`` and
``scaling_factor`` 1, ``latent_channels`` the UNet's ``out_channels``; its workdir has no
``vae.safetensors`` and ``model.json`` says ``"vae": null``.
The methods are compiled once per input shape (``load`` is given the compiler by
``targets/load.py``, a program boundary); ``apply_fn``, ``encode_fn``, ``decode_fn`` and
``encode_text_fn`` are the same computations as pure functions of ``params``, for jitting inside
larger programs.

The workdir (``W/``), written by ``save`` (``python -m drc_jax.convert --format=diffusers-sd``):

* ``unet.safetensors``, ``vae.safetensors``, ``text_encoder.safetensors``: float32 weights in our
  parameter layouts (``models/unet_cond.py``, ``models/autoencoder_kl.py``,
  ``models/clip_text.py``), one tensor per dotted parameter name;
* ``tokenizer/``: the pipeline's CLIP tokenizer files (``vocab.json``, ``merges.txt`` and, when
  present, ``tokenizer_config.json`` and ``special_tokens_map.json``), copied byte for byte;
* ``model.json`` (written last: it marks the workdir complete): ``format`` (``FORMAT``), the
  three architectures (``unet``, ``vae`` or null, ``text_encoder``), the noise schedule
  (``diffusion``: num_timesteps, beta_schedule, beta_start, beta_end), ``prediction_type``
  (``epsilon`` or ``v_prediction``), ``scaling_factor``, ``source`` (``drc_jax`` for a target
  trained here), ``pipeline`` (the diffusers class), ``step``, ``sha256``: the SHA-256 of every
  weights and tokenizer file, and any extra fields the writer adds (a target trained here:
  ``trained_on``, the member split, and ``text_model``, its config section). Loading checks every
  hash first, so a changed or corrupted file is an error naming it, never a silently different
  model.

Random tiny targets for smoke runs (``load_target('random:sd-tiny')``) are built in memory by
``targets/sd_random.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath

from drc_jax.core import fileio, records
from drc_jax.core import schedule as schedule_lib
from drc_jax.models import autoencoder_kl as kl_lib
from drc_jax.models import clip_text, clip_tokenizer, unet_cond
from drc_jax.models import unet as unet_lib
from drc_jax.targets import checkpoints

FORMAT = checkpoints.SD_FORMAT
KIND = 'stable_diffusion'
PREDICTION_TYPES = ('epsilon', 'v_prediction')
PARTS = ('unet', 'vae', 'text_encoder')  # each saved as <part>.safetensors
TOKENIZER_DIR = 'tokenizer'
TOKENIZER_FILES = ('vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json')
REQUIRED_TOKENIZER_FILES = TOKENIZER_FILES[:2]
DIFFUSION_KEYS = ('num_timesteps', 'beta_schedule', 'beta_start', 'beta_end')
PIPELINE = 'StableDiffusionPipeline'


def weights_name(part: str) -> str:
  return f'{part}.safetensors'


@dataclasses.dataclass(frozen=True)
class SDParts:
  """A Stable Diffusion model in memory, as ``save`` writes it.

  Attributes:
    unet: (UNetCondConfig, params); vae: (AutoencoderKLConfig, params), or None for a
      pixel-space target; text_encoder: (CLIPTextConfig, params): params are nested dicts of
      float32 arrays in our layouts.
    tokenizer_files: file name (of ``TOKENIZER_FILES``) -> its bytes.
    diffusion: the noise schedule (``DIFFUSION_KEYS``, our beta_schedule names).
    prediction_type: 'epsilon' or 'v_prediction'.
    source: where it came from; pipeline: the diffusers pipeline class; step: 0 when unknown.
  """

  unet: tuple[unet_cond.UNetCondConfig, Any]
  vae: tuple[kl_lib.AutoencoderKLConfig, Any] | None
  text_encoder: tuple[clip_text.CLIPTextConfig, Any]
  tokenizer_files: dict[str, bytes]
  diffusion: dict[str, Any]
  prediction_type: str
  source: str
  pipeline: str = PIPELINE
  step: int = 0


def flat_bytes(params) -> bytes:
  """A params tree as the safetensors file ``save`` writes (its SHA-256 is the recorded one)."""
  flat = unet_lib.flat_params(params)
  return safetensors.numpy.save({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()})


def save(workdir, parts: SDParts, extra: dict[str, Any] | None = None) -> None:
  """Writes ``parts`` into ``workdir``: the weights, the tokenizer, then ``model.json`` (last).

  The caller checks that the workdir holds no target (``workdir_files``), or rewrites its own.
  ``extra``: more top-level fields of ``model.json`` (JSON values; e.g. ``trained_on``), none of
  the fields ``save`` writes itself.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  hashes = {}
  for part in PARTS:
    if getattr(parts, part) is None:  # a pixel-space target's vae
      continue
    data = flat_bytes(getattr(parts, part)[1])
    fileio.atomic_write_bytes(workdir / weights_name(part), data)
    hashes[weights_name(part)] = hashlib.sha256(data).hexdigest()
  (workdir / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
  for name, data in sorted(parts.tokenizer_files.items()):
    fileio.atomic_write_bytes(workdir / TOKENIZER_DIR / name, data)
    hashes[f'{TOKENIZER_DIR}/{name}'] = hashlib.sha256(data).hexdigest()
  vae_cfg = None if parts.vae is None else parts.vae[0]
  doc = {
    'format': FORMAT,
    'kind': KIND,
    'source': parts.source,
    'pipeline': parts.pipeline,
    'step': int(parts.step),
    'unet': parts.unet[0].to_dict(),
    'vae': None if vae_cfg is None else vae_cfg.to_dict(),
    'text_encoder': dataclasses.asdict(parts.text_encoder[0]),
    'diffusion': {k: parts.diffusion[k] for k in DIFFUSION_KEYS if k in parts.diffusion},
    'prediction_type': parts.prediction_type,
    'scaling_factor': 1.0 if vae_cfg is None else vae_cfg.scaling_factor,
    'tokenizer': TOKENIZER_DIR,
    'sha256': hashes,
  }
  clash = sorted(set(extra or {}) & set(doc))
  if clash:
    raise ValueError(f'sd.save: extra fields {clash} are written by save itself')
  doc.update(extra or {})
  fileio.atomic_write_text(workdir / checkpoints.MODEL_JSON, json.dumps(doc, indent=1))


def workdir_files(workdir) -> list[epath.Path]:
  """The paths ``save`` writes (those that exist make the workdir not fresh)."""
  w = epath.Path(workdir)
  return [w / checkpoints.MODEL_JSON, *(w / weights_name(p) for p in PARTS), w / TOKENIZER_DIR]


def is_sd_workdir(path) -> bool:
  """True when ``path/model.json`` is readable and says ``format: FORMAT``."""
  p = epath.Path(path) / checkpoints.MODEL_JSON
  try:
    return p.exists() and json.loads(p.read_text()).get('format') == FORMAT
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
    return False


def target_files(path) -> list[epath.Path]:
  """What ``load`` reads: ``model.json`` and every file its ``sha256`` records, sorted."""
  path = epath.Path(path)
  doc = records.read_json(path / checkpoints.MODEL_JSON, checkpoints.CheckpointError)
  recorded = doc.get('sha256')
  names = sorted(recorded) if isinstance(recorded, dict) else []
  return [path / checkpoints.MODEL_JSON, *(path / n for n in names)]


def _read_doc(path: epath.Path) -> dict[str, Any]:
  """model.json, its sections checked (not the hashes)."""
  where = path / checkpoints.MODEL_JSON
  doc = records.read_json(where, checkpoints.CheckpointError)
  if doc.get('format') != FORMAT:
    raise checkpoints.CheckpointError(f'{where}: format {doc.get("format")!r}, expected {FORMAT!r}')
  missing = [k for k in (*PARTS, 'diffusion', 'prediction_type', 'sha256') if k not in doc]
  if missing:
    raise checkpoints.CheckpointError(f'{where}: missing sections {missing}')
  if doc['prediction_type'] not in PREDICTION_TYPES:
    raise checkpoints.CheckpointError(
      f'{where}: prediction_type {doc["prediction_type"]!r} is not one of {PREDICTION_TYPES}'
    )
  return doc


def _verify(path: epath.Path, doc: dict[str, Any]) -> dict[str, bytes]:
  """{recorded name: bytes}, each checked against its recorded SHA-256."""
  where = path / checkpoints.MODEL_JSON
  recorded = doc['sha256']
  need = [weights_name(p) for p in PARTS if doc[p] is not None] + [
    f'{TOKENIZER_DIR}/{n}' for n in REQUIRED_TOKENIZER_FILES
  ]
  unrecorded = [n for n in need if not isinstance(recorded, dict) or n not in recorded]
  if unrecorded:
    raise checkpoints.CheckpointError(f'{where}: records no SHA-256 of {unrecorded}')
  out = {}
  for name, want in sorted(recorded.items()):
    f = path / name
    if name.startswith('/') or '..' in name.split('/') or not f.exists():
      raise checkpoints.CheckpointError(f'{f}: missing (recorded in {where})')
    data = f.read_bytes()
    have = hashlib.sha256(data).hexdigest()
    if have != want:
      raise checkpoints.CheckpointError(
        f'{f}: SHA-256 {have[:16]}... differs from the recorded {str(want)[:16]}... in {where}; '
        f'the file was changed or corrupted (convert the target again)'
      )
    out[name] = data
  return out


def _params(data: bytes, where: epath.Path, abstract) -> Any:
  try:
    flat = safetensors.numpy.load(data)
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise checkpoints.CheckpointError(f'{where}: unreadable safetensors file ({e})') from e
  expected = unet_lib.flat_param_shapes(abstract)
  detail = checkpoints.describe_mismatch(expected, {k: tuple(v.shape) for k, v in flat.items()})
  if detail:
    raise checkpoints.CheckpointError(f'{where}: weights do not match model.json: {detail}')
  bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
  if bad:
    raise checkpoints.CheckpointError(f'{where}: non-finite weights in {bad[:5]}')
  return jax.tree_util.tree_map(jnp.asarray, unet_lib.unflatten_params(abstract, flat))


def no_compile(fn):
  """The default ``compile_fn``: the pure functions run as they are."""
  return fn


@dataclasses.dataclass(frozen=True)
class SDTarget:
  """A Stable Diffusion target (see the module docstring).

  Attributes:
    unet, vae, text_encoder: the models as (config, graphdef) with pure functions; ``vae`` None:
      a pixel-space target (the UNet on the images; ``encode``, ``decode`` the identity).
    params: {'unet': ..., 'vae': ..., 'text_encoder': ...} (jax arrays; no 'vae' when ``vae`` is
      None).
    tokenizer: the CLIP tokenizer (``clip_tokenizer.CLIPTokenizer``).
    schedule: the noise schedule the UNet was trained with.
    prediction_type: what the UNet predicts: 'epsilon' or 'v_prediction'.
    scaling_factor: the UNet sees ``scaling_factor * encode(x)``; ``decode`` takes the latents
      divided by it.
    step: training step (0 for converted models); path: the workdir; source: where it came from.
  """

  unet: unet_cond.CondUNet
  vae: kl_lib.AutoencoderKL | None
  text_encoder: clip_text.CLIPTextEncoder
  params: dict[str, Any]
  tokenizer: clip_tokenizer.CLIPTokenizer
  schedule: schedule_lib.NoiseSchedule
  prediction_type: str
  scaling_factor: float
  step: int = 0
  path: str = ''
  source: str = ''
  _compiled: dict[str, Callable] = dataclasses.field(
    default_factory=dict, repr=False, compare=False
  )

  @classmethod
  def create(cls, compile_fn: Callable = no_compile, **fields) -> SDTarget:
    """The target of ``fields``; its methods run ``compile_fn`` (e.g. ``jax.jit``) of the pure
    functions."""
    target = cls(**fields)
    target._compiled.update(
      apply=compile_fn(target.apply_fn),
      encode=compile_fn(target.encode_fn),
      decode=compile_fn(target.decode_fn),
      encode_text=compile_fn(target.encode_text_fn),
    )
    return target

  # --- pure functions of the params dict, for jitting in larger programs

  def apply_fn(self, params, z, t, context) -> jax.Array:
    """``unet(z, t, context).sample``: [B, h, w, in] latents, [B] t, [B, L, D] -> [B, h, w, 4]."""
    return self.unet.apply(params['unet'], z, t, context)

  def encode_fn(self, params, x) -> jax.Array:
    """[B, H, W, 3] images in [-1, 1] -> [B, H/f, W/f, 4] posterior mean (unscaled); a
    pixel-space target: ``x`` itself."""
    if self.vae is None:
      return jnp.asarray(x, jnp.float32)
    return self.vae.posterior_mean(params['vae'], x)

  def decode_fn(self, params, z) -> jax.Array:
    """[B, h, w, 4] unscaled latents -> [B, h*f, w*f, 3] images (not clipped); a pixel-space
    target: ``z`` itself."""
    if self.vae is None:
      return jnp.asarray(z, jnp.float32)
    return self.vae.decode(params['vae'], z)

  def encode_text_fn(self, params, ids) -> jax.Array:
    """int [B, L] token ids -> [B, L, D] ``last_hidden_state`` (the UNet's context)."""
    return self.text_encoder.encode_text(params['text_encoder'], ids)

  # --- properties

  @property
  def is_latent(self) -> bool:
    return True

  @property
  def is_text_conditioned(self) -> bool:
    return True

  @property
  def is_pixel_space(self) -> bool:
    """True when the UNet runs on the images themselves (no autoencoder)."""
    return self.vae is None

  @property
  def in_channels(self) -> int:
    """4, or 9 for an inpainting UNet (noisy latents, mask, masked image's latents)."""
    return self.unet.config.in_channels

  @property
  def is_inpainting(self) -> bool:
    return self.in_channels == 2 * self.latent_channels + 1

  @property
  def latent_channels(self) -> int:
    """The autoencoder's latent width (SD: 4); a pixel-space target's UNet output channels."""
    if self.vae is None:
      return self.unet.config.out_channels
    return self.vae.config.latent_channels

  @property
  def image_channels(self) -> int:
    return self.latent_channels if self.vae is None else self.vae.config.in_channels

  @property
  def downsampling_factor(self) -> int:
    """Image side / latent side (8 for SD, 1 for a pixel-space target)."""
    return 1 if self.vae is None else self.vae.config.downsampling_factor

  @property
  def context_dim(self) -> int:
    return self.text_encoder.config.hidden_size

  # --- compiled conveniences

  def tokenize(self, texts) -> np.ndarray:
    """``texts`` (a list of str) -> int32 [B, 77]: ``CLIPTokenizer(texts, padding='max_length',
    max_length=77, truncation=True).input_ids``."""
    return self.tokenizer.tokenize(texts)

  def encode_text(self, ids) -> jax.Array:
    """int [B, L] ids (``tokenize``'s) -> float32 [B, L, D], the UNet's context."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f'ids must be integer [B, L], got {ids.dtype} {ids.shape}')
    return self._compiled['encode_text'](self.params, ids.astype(jnp.int32))

  def apply(self, z, t, context) -> jax.Array:
    """The UNet's output (epsilon or v, ``prediction_type``).

    Args:
      z: [B, h, w, in_channels] latents (scaled: ``scaling_factor * encode(x)`` plus noise).
      t: [B] or scalar timesteps in [0, T), integer or float.
      context: [B, L, D] text embeddings (``encode_text``).

    Returns:
      [B, h, w, 4] float32.
    """
    z = jnp.asarray(z, jnp.float32)
    c, f = self.in_channels, self.unet.config.downsampling_factor
    if z.ndim != 4 or z.shape[-1] != c or z.shape[1] % f or z.shape[2] % f:
      raise ValueError(f'z must be [B, h, w, {c}] (NHWC), h, w multiples of {f}; got {z.shape}')
    context = jnp.asarray(context, jnp.float32)
    d = self.unet.config.cross_attention_dim
    if context.ndim != 3 or context.shape[0] != z.shape[0] or context.shape[-1] != d:
      raise ValueError(f'context must be [B={z.shape[0]}, L, {d}], got {context.shape}')
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != z.shape[0]):
      raise ValueError(f't must be a scalar or [B={z.shape[0]}], got shape {t.shape}')
    dtype = jnp.int32 if jnp.issubdtype(t.dtype, jnp.integer) else jnp.float32
    t = jnp.broadcast_to(t.astype(dtype), (z.shape[0],))
    return self._compiled['apply'](self.params, z, t, context)

  def encode(self, x) -> jax.Array:
    """[B, H, W, 3] images in [-1, 1] (H, W multiples of the factor) -> [B, H/f, W/f, 4]:
    ``vae.encode(x).latent_dist.mean``, unscaled."""
    x = jnp.asarray(x, jnp.float32)
    f, c = self.downsampling_factor, self.image_channels
    if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'x must be [B, H, W, {c}] (NHWC), H, W multiples of {f}; got {x.shape}')
    return self._compiled['encode'](self.params, x)

  def decode(self, z) -> jax.Array:
    """[B, h, w, 4] unscaled latents (divide the UNet's by ``scaling_factor``) -> [B, h*f, w*f,
    3]: ``vae.decode(z).sample``."""
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f'z must be [B, h, w, {self.latent_channels}] (NHWC), got {z.shape}')
    return self._compiled['decode'](self.params, z)


def load(path, compile_fn: Callable = no_compile) -> SDTarget:
  """Loads a Stable Diffusion workdir, every recorded SHA-256 checked first.

  Args:
    path: the workdir (``model.json`` with ``format: FORMAT``).
    compile_fn: applied to each pure function behind the methods (``targets/load.py`` passes
      ``jax.jit``).

  Raises:
    checkpoints.CheckpointError: naming the file: a missing or changed file, a damaged
      ``model.json`` section, weights that do not match the recorded architecture.
  """
  path = epath.Path(path)
  where = path / checkpoints.MODEL_JSON
  doc = _read_doc(path)
  data = _verify(path, doc)
  try:
    unet_cfg = unet_cond.UNetCondConfig.from_dict(doc['unet'])
    vae_cfg = None if doc['vae'] is None else kl_lib.AutoencoderKLConfig.from_dict(doc['vae'])
    text_cfg = records.dataclass_from_dict(
      clip_text.CLIPTextConfig, doc['text_encoder'], 'text_encoder', ValueError
    )
    diffusion = doc['diffusion']
    if not isinstance(diffusion, dict):
      raise ValueError(f'diffusion is not an object ({diffusion!r})')
    schedule = checkpoints.schedule_from(diffusion)
    scaling = 1.0 if vae_cfg is None else float(doc.get('scaling_factor', vae_cfg.scaling_factor))
  except (KeyError, TypeError, ValueError) as e:
    raise checkpoints.CheckpointError(f'{where}: invalid model description ({e})') from e
  unet, unet_abstract = unet_cond.abstract_model(unet_cfg)
  vae, vae_abstract = (None, None) if vae_cfg is None else kl_lib.abstract_autoencoder_kl(vae_cfg)
  text, text_abstract = clip_text.abstract_text_encoder(text_cfg)
  params = {
    part: _params(data[weights_name(part)], path / weights_name(part), abstract)
    for part, abstract in (
      ('unet', unet_abstract),
      ('vae', vae_abstract),
      ('text_encoder', text_abstract),
    )
    if abstract is not None
  }
  try:
    tokenizer = clip_tokenizer.load(path / TOKENIZER_DIR, tokenizer_length(text_cfg))
  except clip_tokenizer.TokenizerError as e:
    raise checkpoints.CheckpointError(str(e)) from e
  return SDTarget.create(
    compile_fn,
    unet=unet,
    vae=vae,
    text_encoder=text,
    params=params,
    tokenizer=tokenizer,
    schedule=schedule,
    prediction_type=doc['prediction_type'],
    scaling_factor=scaling,
    step=int(doc.get('step', 0)),
    path=str(path),
    source=str(doc.get('source', '')),
  )


def tokenizer_length(text_cfg: clip_text.CLIPTextConfig) -> int:
  """The padded token length: 77 (SD), or a shorter text tower's position table (trained here)."""
  return min(clip_tokenizer.CONTEXT_LENGTH, text_cfg.max_position_embeddings)


def from_parts(parts: SDParts, compile_fn: Callable = no_compile, path: str = '') -> SDTarget:
  """The target of ``parts`` held in memory (what ``load`` returns after ``save(W, parts)``)."""
  text_cfg = parts.text_encoder[0]
  params = {'unet': parts.unet[1], 'text_encoder': parts.text_encoder[1]}
  if parts.vae is not None:
    params['vae'] = parts.vae[1]
  return SDTarget.create(
    compile_fn,
    unet=unet_cond.abstract_model(parts.unet[0])[0],
    vae=None if parts.vae is None else kl_lib.abstract_autoencoder_kl(parts.vae[0])[0],
    text_encoder=clip_text.abstract_text_encoder(text_cfg)[0],
    params=jax.tree_util.tree_map(jnp.asarray, params),
    tokenizer=clip_tokenizer.from_files(parts.tokenizer_files, tokenizer_length(text_cfg)),
    schedule=checkpoints.schedule_from(parts.diffusion),
    prediction_type=parts.prediction_type,
    scaling_factor=1.0 if parts.vae is None else parts.vae[0].scaling_factor,
    step=int(parts.step),
    path=path,
    source=parts.source,
  )
