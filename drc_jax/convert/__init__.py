"""Imports PyTorch checkpoints as drc_jax targets (orbax checkpoint + ``model.json``).

Two public layouts of the DDPM CIFAR10 UNet are read:

* ``pytorch-ddpm`` (github.com/w86763777/pytorch-ddpm, the targets of SecMI and PIA): a ``.pt``
  dict with ``net_model`` and ``ema_model`` state dicts (EMA by default), or a bare state dict.
  The architecture (ch, ch_mult, num_res_blocks, attention levels, channels, T) is read from the
  state dict's keys and shapes; only the image resolution is not stored (default 32).
* ``diffusers``: a ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model``
  ``.safetensors`` or ``.bin``) in the google/ddpm-cifar10-32 layout. The architecture comes from
  ``config.json``; settings our UNet does not compute are refused, naming the field.

  python -m drc_jax.convert --format=pytorch-ddpm --src=ckpt.pt --workdir=runs/secmi_cifar10
  python -m drc_jax.convert --format=diffusers --src=ddpm-cifar10-32 --workdir=runs/google_ddpm

A latent diffusion target comes from a diffusers ``LDMPipeline`` folder (``vqvae/``, ``unet/``,
``scheduler/``; see ``drc_jax.convert.diffusers_ldm``):

  python -m drc_jax.convert --format=diffusers-ldm --src=ldm-ffhq --workdir=runs/ffhq_ldm

or from an original CompVis latent-diffusion ``.ckpt`` and its training config (the same networks;
see ``drc_jax.convert.compvis_ldm``):

  python -m drc_jax.convert --format=compvis-ldm --src=models/ldm/ffhq256/model.ckpt \
      --config=models/ldm/ffhq256/config.yaml --workdir=runs/ffhq_ldm

A Stable Diffusion target (text-conditioned UNet, KL autoencoder, CLIP text tower and tokenizer,
loaded as ``targets.sd.SDTarget``) comes from a diffusers ``StableDiffusionPipeline`` or
``StableDiffusionInpaintPipeline`` folder (see ``drc_jax.convert.diffusers_sd``):

  python -m drc_jax.convert --format=diffusers-sd --src=stable-diffusion-2-1 --workdir=runs/sd2

or from one checkpoint in the original CompVis/Stability layout (``.safetensors`` or ``.ckpt``) with
its original inference YAML and a tokenizer folder, or a diffusers pipeline folder as its config
(see ``drc_jax.convert.sd_single_file``):

  python -m drc_jax.convert --format=sd-single-file --src=v1-5-pruned-emaonly.safetensors \
      --original_config=v1-inference.yaml --tokenizer=sd15/tokenizer --workdir=runs/sd15

Every parameter of the model must come from exactly one source tensor of the expected shape, and
every source tensor must be used: a missing, unexpected, misshapen or non-finite tensor is a
``ConversionError`` naming the key, raised before anything is written. Safetensors files are read
without torch; pickled files (``.pt``/``.pth``/``.bin``) only with ``torch.load(...,
weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from absl import logging

from drc_jax.convert import diffusers_sd
from drc_jax.convert.common import (
  DEFAULT_DIFFUSION,
  ConversionError,
  Converted,
  arch,
  read_checkpoint,
  write_target,
)
from drc_jax.convert.compvis_ldm import convert_compvis_ldm
from drc_jax.convert.diffusers import convert_diffusers, diffusers_config
from drc_jax.convert.diffusers_ldm import convert_diffusers_ldm
from drc_jax.convert.diffusers_sd import convert_diffusers_sd
from drc_jax.convert.pytorch_ddpm import (
  convert_pytorch_ddpm,
  pytorch_ddpm_config,
  select_pytorch_ddpm_weights,
)
from drc_jax.convert.sd_single_file import convert_sd_single_file
from drc_jax.models import unet as model_lib
from drc_jax.targets import encoders, sd

TARGET_FORMATS = (
  'pytorch-ddpm',
  'diffusers',
  'diffusers-ldm',
  'compvis-ldm',
  'diffusers-sd',
  'sd-single-file',
)
LATENT_FORMATS = ('diffusers-ldm', 'compvis-ldm')
# Encoder formats: format -> module under drc_jax.convert with
# ``read(src) -> (family, config, params, encoders.Preprocess, source)``.
ENCODER_FORMATS: dict[str, str] = {
  'timm-vit': 'drc_jax.convert.timm_vit',  # timm VisionTransformer / DINO backbone state dict
  'open-clip': 'drc_jax.convert.open_clip',  # OpenCLIP checkpoint (its visual.* image tower)
  'hf-clip': 'drc_jax.convert.hf_clip',  # HF CLIPVisionModelWithProjection or CLIPModel folder
  'facenet': 'drc_jax.convert.facenet',
}
FORMATS = TARGET_FORMATS + tuple(ENCODER_FORMATS)

__all__ = [
  'DEFAULT_DIFFUSION',
  'ENCODER_FORMATS',
  'FORMATS',
  'TARGET_FORMATS',
  'ConversionError',
  'Converted',
  'convert',
  'convert_encoder',
  'convert_diffusers',
  'convert_compvis_ldm',
  'convert_diffusers_ldm',
  'convert_diffusers_sd',
  'convert_sd_single_file',
  'convert_pytorch_ddpm',
  'diffusers_config',
  'pytorch_ddpm_config',
  'read_checkpoint',
  'select_pytorch_ddpm_weights',
  'write_target',
]


def convert(
  fmt: str,
  src,
  workdir,
  *,
  weights: str | None = None,
  resolution: int | None = None,
  diffusion: dict[str, Any] | None = None,
  scaling_factor: float | None = None,
  config=None,
  original_config=None,
  tokenizer=None,
  no_ema: bool = False,
) -> Converted | sd.SDParts:
  """Converts ``src`` (format ``fmt``, one of ``TARGET_FORMATS``) into the target ``workdir``.

  ``weights`` ('ema' or 'net') applies to 'pytorch-ddpm' (default 'ema') and 'compvis-ldm'
  (default: EMA when the checkpoint has it); ``resolution`` is the image side (for latent targets
  too, where the latents are smaller); ``scaling_factor`` applies to latent targets
  (``LATENT_FORMATS``) and ``config`` (the training config) to 'compvis-ldm' only.
  'diffusers-sd' takes none of these (only ``diffusion``, checked against its scheduler config).
  'sd-single-file' takes ``config`` (a diffusers pipeline folder) or ``original_config`` (the
  original YAML) with ``tokenizer`` (a tokenizer folder), ``no_ema`` and ``diffusion``; the other
  formats none of these three.

  Returns:
    The converted target (also written to ``workdir``, readable with ``drc_jax.load_target``):
    a ``Converted``, or for 'diffusers-sd' and 'sd-single-file' the ``targets.sd.SDParts`` written.
  """
  single = {'original_config': original_config, 'tokenizer': tokenizer, 'no_ema': no_ema or None}
  if fmt != 'sd-single-file' and any(v is not None for v in single.values()):
    raise ConversionError(f'{", ".join(k for k, v in single.items() if v)} apply to sd-single-file')
  if fmt in ('diffusers-sd', 'sd-single-file'):
    options = {'weights': weights, 'resolution': resolution, 'scaling_factor': scaling_factor}
    if fmt == 'diffusers-sd':
      options['config'] = config
    given = [k for k, v in options.items() if v is not None]
    if given:
      raise ConversionError(f'{given[0]} does not apply to {fmt}')
    if fmt == 'sd-single-file':
      parts = convert_sd_single_file(
        src,
        config=config,
        original_config=original_config,
        tokenizer=tokenizer,
        no_ema=no_ema,
        diffusion=diffusion,
      )
    else:
      parts = convert_diffusers_sd(src, diffusion)
    diffusers_sd.write(workdir, parts)
    logging.info(
      'converted %s -> %s: %s, in_channels %d, %s, schedule %s; %d + %d + %d parameters',
      parts.source,
      workdir,
      parts.pipeline,
      parts.unet[0].in_channels,
      parts.prediction_type,
      parts.diffusion,
      *(model_lib.count_params(getattr(parts, p)[1]) for p in sd.PARTS),
    )
    return parts
  if scaling_factor is not None and fmt not in LATENT_FORMATS:
    raise ConversionError(f'scaling_factor applies to latent targets {LATENT_FORMATS}, not {fmt!r}')
  if config is not None and fmt != 'compvis-ldm':
    raise ConversionError(f'config applies to compvis-ldm, not {fmt!r}')
  if weights is not None and fmt not in ('pytorch-ddpm', 'compvis-ldm'):
    raise ConversionError(f'weights applies to pytorch-ddpm and compvis-ldm, not {fmt!r}')
  if fmt == 'pytorch-ddpm':
    converted = convert_pytorch_ddpm(src, weights or 'ema', resolution, diffusion)
  elif fmt == 'diffusers':
    converted = convert_diffusers(src, resolution, diffusion)
  elif fmt == 'diffusers-ldm':
    converted = convert_diffusers_ldm(src, resolution, diffusion, scaling_factor)
  elif fmt == 'compvis-ldm':
    converted = convert_compvis_ldm(src, config, resolution, diffusion, scaling_factor, weights)
  else:
    raise ConversionError(f'unknown format {fmt!r}; expected one of {FORMATS}')
  write_target(workdir, converted)
  logging.info(
    'converted %s -> %s: %s, %d parameters, schedule %s, step %d',
    converted.source,
    workdir,
    arch(converted.config),
    model_lib.count_params(converted.params),
    converted.diffusion,
    converted.step,
  )
  if converted.latent is not None:
    logging.info(
      'latent target: %s; autoencoder %s, %d parameters',
      converted.latent,
      converted.autoencoder[0],
      model_lib.count_params(converted.autoencoder[1]),
    )
  return converted


def convert_encoder(fmt: str, src, out, **options):
  """Converts encoder weights ``src`` (format ``fmt``, a key of ``ENCODER_FORMATS``) into the
  encoder directory ``out``; returns ``drc_jax.load_encoder(out)``.

  ``options`` (settings the weights do not store, e.g. ``heads``, ``activation``) go to the
  format's ``read``; one it does not take is an error naming it.
  """
  if fmt not in ENCODER_FORMATS:
    raise ConversionError(
      f'unknown encoder format {fmt!r}; expected one of {tuple(ENCODER_FORMATS)}'
    )
  reader = importlib.import_module(ENCODER_FORMATS[fmt])
  options = {k: v for k, v in options.items() if v is not None}
  accepted = inspect.signature(reader.read).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ConversionError(f'--format={fmt} does not take {", ".join("--" + k for k in unknown)}')
  family, config, params, preprocess, source = reader.read(src, **options)
  encoders.save_encoder(out, family, config, params, preprocess, source=source, fmt=fmt)
  logging.info(
    'converted %s -> %s: %s encoder, %d parameters',
    source,
    out,
    family,
    model_lib.count_params(params),
  )
  return encoders.load_encoder(out)
