"""``diffusers-sd``: a Stable Diffusion target from a diffusers ``StableDiffusionPipeline`` or
``StableDiffusionInpaintPipeline`` folder (SD 1.x and 2.x, epsilon or v prediction).

  python -m drc_jax.convert --format=diffusers-sd --src=stable-diffusion-2-1 --workdir=runs/sd2

The folder holds ``model_index.json`` (its ``_class_name`` checked when present), ``unet/`` (a
``UNet2DConditionModel``: ``convert/sd_unet.py``, one file or shards), ``vae/`` (an
``AutoencoderKL``: ``convert/sd_vae.py``), ``text_encoder/`` (a transformers ``CLIPTextModel``:
``convert/sd_text.py``, one file or shards), ``tokenizer/`` (CLIP's ``vocab.json`` and
``merges.txt``, read by ``models/clip_tokenizer.py`` and copied as they are) and
``scheduler/scheduler_config.json``. ``safety_checker/`` and ``feature_extractor/`` are not read.
``--src`` may also be a Hugging Face repo id already in the local Hub cache (resolved with
``huggingface_hub.snapshot_download(..., local_files_only=True)``; nothing is downloaded).

From the scheduler config (any of diffusers' DDPM-family schedulers: ``SCHEDULERS``) the training
schedule is read: ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear`` -- SD's
0.00085..0.012 -- or ``squaredcos_cap_v2``), ``beta_start``, ``beta_end`` (diffusers' defaults when
absent) and ``prediction_type`` (``epsilon`` or ``v_prediction``, the SD 2.x 768 models);
``trained_betas``, ``rescale_betas_zero_snr``, another prediction type or another scheduler class
are refused by name. Sampling settings (``timestep_spacing``, ``steps_offset``, ``clip_sample``...)
do not change what the UNet computes and are not recorded. The latent scaling is
``vae/config.json``'s ``scaling_factor`` (SD's 0.18215); a ``shift_factor`` is refused (the SD
pipelines do not apply one).

The parts must fit together: the UNet's ``out_channels`` and the VAE's ``latent_channels`` agree,
its ``in_channels`` are those (text-to-image) or ``2 * latent_channels + 1`` (inpainting: latents,
mask, masked-image latents), its ``cross_attention_dim`` is the text tower's width, the tokenizer's
ids fit the text tower's vocabulary and its 77 positions. Every failure is one ``ConversionError``
naming the file and field or key, raised before anything is written; the workdir is then written
by ``targets/sd.py`` (``save``) and read back by ``drc_jax.load_target``.
"""

from __future__ import annotations

import re
from typing import Any

from etils import epath

from drc_jax.convert import diffusers as diffusers_lib
from drc_jax.convert.common import ConversionError, diffusion_settings
from drc_jax.convert.sd_text import convert_text_encoder
from drc_jax.convert.sd_unet import convert_unet_cond
from drc_jax.convert.sd_vae import convert_autoencoder_kl
from drc_jax.core import records
from drc_jax.models import clip_tokenizer
from drc_jax.targets import sd

try:
  import huggingface_hub
except ImportError:  # optional: only a repo id as --src needs it
  huggingface_hub = None

PIPELINES = (
  'StableDiffusionPipeline',
  'StableDiffusionInpaintPipeline',
  'StableDiffusionImg2ImgPipeline',
)
PARTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
# Schedulers whose training schedule is DDPM's betas (the ones SD repositories ship, and the
# usual swaps); a flow-matching or consistency scheduler is refused by its class name.
SCHEDULERS = (
  'DDPMScheduler',
  'DDIMScheduler',
  'PNDMScheduler',
  'LMSDiscreteScheduler',
  'EulerDiscreteScheduler',
  'EulerAncestralDiscreteScheduler',
  'DPMSolverMultistepScheduler',
  'DPMSolverSinglestepScheduler',
  'HeunDiscreteScheduler',
  'KDPM2DiscreteScheduler',
  'KDPM2AncestralDiscreteScheduler',
  'UniPCMultistepScheduler',
  'DEISMultistepScheduler',
)
SCHEDULER_DEFAULTS = {  # diffusers' defaults of the fields read
  'num_train_timesteps': 1000,
  'beta_start': 0.0001,
  'beta_end': 0.02,
  'beta_schedule': 'linear',
  'prediction_type': 'epsilon',
}
_REPO_ID = re.compile(r'^[\w.-]+/[\w.-]+$')


def resolve_src(src) -> epath.Path:
  """The pipeline folder: ``src`` itself, or a Hugging Face repo id found in the local Hub cache."""
  path = epath.Path(src)
  if path.exists() or not _REPO_ID.match(str(src)):
    return path
  if huggingface_hub is None:
    raise ConversionError(
      f'{src}: no such folder (as a Hugging Face repo id it needs huggingface_hub installed)'
    )
  try:
    return epath.Path(huggingface_hub.snapshot_download(str(src), local_files_only=True))
  except Exception as e:  # LocalEntryNotFoundError, an invalid id...: not in the cache
    raise ConversionError(
      f'{src}: no such folder, nor a repo in the local Hugging Face cache ({type(e).__name__}); '
      f'drc_jax never downloads: fetch it first (huggingface-cli download {src})'
    ) from e


def scheduler_settings(path: epath.Path) -> tuple[dict[str, Any], str]:
  """(the schedule as ``model.json`` records it, prediction_type) of ``scheduler_config.json``.

  Raises:
    ConversionError: naming the file and the field: another scheduler class, learned or rescaled
      betas, an unknown beta_schedule or prediction_type.
  """
  s = records.read_json(path, ConversionError)
  cls = s.get('_class_name')
  if cls is not None and cls not in SCHEDULERS:
    raise ConversionError(
      f'{path}: _class_name {cls!r} is not a DDPM-family scheduler (one of {", ".join(SCHEDULERS)})'
    )
  c = dict(SCHEDULER_DEFAULTS, **{k: v for k, v in s.items() if v is not None})
  if s.get('trained_betas') is not None:
    raise ConversionError(f'{path}: trained_betas is not supported (only beta_schedule)')
  if s.get('rescale_betas_zero_snr'):
    raise ConversionError(f'{path}: rescale_betas_zero_snr=true is not supported')
  kind = c['beta_schedule']
  if kind not in diffusers_lib.SCHEDULES:
    raise ConversionError(
      f'{path}: unsupported beta_schedule={kind!r} (one of {", ".join(diffusers_lib.SCHEDULES)})'
    )
  pred = c['prediction_type']
  if pred not in sd.PREDICTION_TYPES:
    raise ConversionError(
      f'{path}: unsupported prediction_type={pred!r} (one of {", ".join(sd.PREDICTION_TYPES)})'
    )
  found = {'beta_schedule': diffusers_lib.SCHEDULES[kind]}
  for ours, theirs, kind_of in (
    ('num_timesteps', 'num_train_timesteps', int),
    ('beta_start', 'beta_start', float),
    ('beta_end', 'beta_end', float),
  ):
    v = c[theirs]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind_of is int and v != int(v)):
      raise ConversionError(f'{path}: {theirs}={v!r} is not a number of the expected kind')
    found[ours] = kind_of(v)
  if found['num_timesteps'] < 1 or not 0 < found['beta_start'] <= found['beta_end'] < 1:
    raise ConversionError(
      f'{path}: num_train_timesteps={found["num_timesteps"]}, beta_start={found["beta_start"]}, '
      f'beta_end={found["beta_end"]} do not make a schedule'
    )
  return found, pred


def _tokenizer_files(folder: epath.Path, vocab_size: int, positions: int) -> dict[str, bytes]:
  """The tokenizer files to copy, after reading them as ``load_target`` will."""
  try:
    tok = clip_tokenizer.load(folder)
  except clip_tokenizer.TokenizerError as e:
    hint = ''
    if (folder / 'tokenizer.json').exists() and not (folder / 'vocab.json').exists():
      hint = ' (tokenizer.json alone, as transformers 5.x saves it, is not read)'
    raise ConversionError(f'{e}{hint}') from e
  top = max(tok.vocab.values())
  if top >= vocab_size:
    raise ConversionError(
      f'{folder / "vocab.json"}: id {top} does not fit the text encoder vocab_size={vocab_size} '
      f'(text_encoder/config.json)'
    )
  if tok.max_length > positions:
    raise ConversionError(
      f'text_encoder/config.json: max_position_embeddings={positions} < the tokenizer length '
      f'{tok.max_length}'
    )
  return {n: (folder / n).read_bytes() for n in sd.TOKENIZER_FILES if (folder / n).exists()}


def convert_diffusers_sd(src, diffusion: dict[str, Any] | None = None) -> sd.SDParts:
  """Reads a diffusers Stable Diffusion pipeline folder (see the module docstring).

  Args:
    src: the pipeline folder, or a Hugging Face repo id in the local Hub cache.
    diffusion: explicit schedule settings (num_timesteps, beta_start, beta_end); each must agree
      with ``scheduler_config.json``.

  Returns:
    The model in memory, for ``write``.

  Raises:
    ConversionError: naming the folder, file, field or key refused.
  """
  src = resolve_src(src)
  if not src.is_dir():
    raise ConversionError(f'{src}: not a folder (expected a diffusers StableDiffusionPipeline)')
  index = src / 'model_index.json'
  pipeline = 'StableDiffusionPipeline'
  if index.exists():
    pipeline = records.read_json(index, ConversionError).get('_class_name', pipeline)
    if pipeline not in PIPELINES:
      raise ConversionError(
        f'{index}: _class_name {pipeline!r} is not a Stable Diffusion pipeline (one of '
        f'{", ".join(PIPELINES)})'
      )
  for part in PARTS:
    if not (src / part).is_dir():
      raise ConversionError(
        f'{src / part}: missing; a Stable Diffusion pipeline folder holds {", ".join(PARTS)}'
      )
  sched = src / 'scheduler' / 'scheduler_config.json'
  found, prediction_type = scheduler_settings(sched)
  schedule = diffusion_settings(found, diffusion, str(sched))

  unet_cfg, unet_params = convert_unet_cond(src / 'unet')
  vae_cfg, vae_params = convert_autoencoder_kl(src / 'vae')
  text_cfg, text_params = convert_text_encoder(src / 'text_encoder')
  vae_json, unet_json = src / 'vae' / 'config.json', src / 'unet' / 'config.json'
  if vae_cfg.shift_factor:
    raise ConversionError(
      f'{vae_json}: unsupported shift_factor={vae_cfg.shift_factor} (Stable Diffusion pipelines '
      f'scale latents by scaling_factor only)'
    )
  latent = vae_cfg.latent_channels
  if unet_cfg.out_channels != latent or unet_cfg.in_channels not in (latent, 2 * latent + 1):
    raise ConversionError(
      f'{unet_json}: in_channels={unet_cfg.in_channels}, out_channels={unet_cfg.out_channels} do '
      f'not fit the latent_channels={latent} of {vae_json} (in: {latent}, or {2 * latent + 1} '
      f'for inpainting; out: {latent})'
    )
  if vae_cfg.in_channels != 3 or vae_cfg.out_channels != 3:
    raise ConversionError(f'{vae_json}: in_channels and out_channels must be 3 (RGB)')
  if unet_cfg.cross_attention_dim != text_cfg.hidden_size:
    raise ConversionError(
      f'{unet_json}: cross_attention_dim={unet_cfg.cross_attention_dim} differs from the '
      f'hidden_size={text_cfg.hidden_size} of {src / "text_encoder" / "config.json"}'
    )
  tokenizer_files = _tokenizer_files(
    src / 'tokenizer', text_cfg.vocab_size, text_cfg.max_position_embeddings
  )
  return sd.SDParts(
    unet=(unet_cfg, unet_params),
    vae=(vae_cfg, vae_params),
    text_encoder=(text_cfg, text_params),
    tokenizer_files=tokenizer_files,
    diffusion=schedule,
    prediction_type=prediction_type,
    source=f'diffusers-sd:{src}',
    pipeline=pipeline,
  )


def write(workdir, parts: sd.SDParts) -> None:
  """Writes ``parts`` into the fresh ``workdir`` (``targets/sd.py``'s ``save``).

  Raises:
    ConversionError: the workdir already holds a target (or one of the files written here).
  """
  workdir = epath.Path(workdir)
  taken = [p for p in sd.workdir_files(workdir) if p.exists()]
  if (workdir / 'checkpoints').exists():
    taken.append(workdir / 'checkpoints')
  if taken:
    raise ConversionError(f'{taken[0]} exists: convert into a fresh workdir')
  sd.save(workdir, parts)
