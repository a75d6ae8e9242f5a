"""``python -m drc_jax.convert``: converts a PyTorch checkpoint into a drc_jax workdir.

python -m drc_jax.convert --format=pytorch-ddpm --src=ckpt.pt --workdir=runs/secmi_cifar10
python -m drc_jax.convert --format=diffusers --src=ddpm-cifar10-32 --workdir=runs/google_ddpm
python -m drc_jax.convert --format=diffusers-ldm --src=ldm-ffhq --workdir=runs/ffhq_ldm
python -m drc_jax.convert --format=compvis-ldm --src=ffhq256/model.ckpt --workdir=runs/ffhq_ldm
python -m drc_jax.convert --format=diffusers-sd --src=stable-diffusion-2-1 --workdir=runs/sd2
python -m drc_jax.convert --format=sd-single-file --src=v1-5.safetensors \
    --original_config=v1-inference.yaml --tokenizer=sd15/tokenizer --workdir=runs/sd15
python -m drc_jax.convert --format=timm-vit --src=dino_deitsmall16_pretrain.pth --out=enc/dino
python -m drc_jax.convert --format=facenet --src=20180402-114759-vggface2.pt --out=enc/facenet
"""

from __future__ import annotations

from absl import app, flags

from drc_jax.convert import ENCODER_FORMATS, FORMATS, LATENT_FORMATS, convert, convert_encoder
from drc_jax.core import errors


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so importing never clashes)."""
  flags.DEFINE_enum('format', None, FORMATS, 'Layout of --src.')
  flags.DEFINE_string(
    'src',
    None,
    'pytorch-ddpm: .pt/.pth/.safetensors file; diffusers: model '
    'folder (config.json + weights), pipeline folder or weights file; diffusers-ldm: '
    'LDMPipeline folder (vqvae/, unet/, scheduler/); diffusers-sd: StableDiffusion(Inpaint)'
    'Pipeline folder or a repo id in the local Hugging Face cache; compvis-ldm: latent-diffusion '
    '.ckpt; sd-single-file: an original-layout Stable Diffusion .safetensors or .ckpt; facenet: '
    'InceptionResnetV1 state dict (.pt/.pth/.safetensors).',
  )
  flags.DEFINE_string('workdir', None, 'Targets: fresh drc_jax workdir to write (local or gs://).')
  flags.DEFINE_string('out', None, 'Encoders: fresh encoder directory to write (local or gs://).')
  flags.DEFINE_enum(
    'weights',
    'ema',
    ['ema', 'net'],
    'pytorch-ddpm, compvis-ldm: which weights of a training checkpoint to convert (default: '
    'ema; compvis-ldm: ema when the checkpoint holds model_ema.*).',
  )
  flags.DEFINE_integer(
    'resolution', None, 'Image side (default: 32 for pytorch-ddpm, sample_size for diffusers).'
  )
  flags.DEFINE_integer('num_timesteps', None, 'T (default: recorded by the source, else 1000).')
  flags.DEFINE_float('beta_start', None, 'Linear schedule start (default: recorded, else 1e-4).')
  flags.DEFINE_float('beta_end', None, 'Linear schedule end (default: recorded, else 0.02).')
  flags.DEFINE_float(
    'scaling_factor',
    None,
    'Latent targets: scaling factor (diffusers-ldm default: vqvae/config.json, else 1.0; '
    'compvis-ldm: the scale_factor buffer, else the config, else 1.0).',
  )
  flags.DEFINE_string(
    'config',
    None,
    'compvis-ldm: the training config, YAML or JSON (default: config.yaml beside --src); '
    'sd-single-file: a diffusers pipeline folder whose configs describe --src.',
  )
  flags.DEFINE_string(
    'original_config',
    None,
    'sd-single-file: the original inference YAML (v1-inference.yaml, v2-inference-v.yaml, '
    'v1-inpainting-inference.yaml), instead of --config.',
  )
  flags.DEFINE_string(
    'tokenizer',
    None,
    'sd-single-file: a CLIP tokenizer folder (vocab.json, merges.txt); required with '
    '--original_config (default with --config: its tokenizer/). Nothing is downloaded.',
  )
  flags.DEFINE_bool(
    'no_ema',
    False,
    'sd-single-file: convert the raw UNet weights (model.diffusion_model.*) even when the '
    'checkpoint holds EMA weights (model_ema.*, converted by default).',
  )
  flags.DEFINE_integer(
    'heads', None, 'timm-vit, open-clip: attention heads (not stored; default width / 64).'
  )
  flags.DEFINE_enum(
    'activation',
    None,
    ['gelu', 'quick_gelu'],
    'open-clip: MLP activation (not stored; default from open_clip_config.json).',
  )
  flags.DEFINE_bool('verbose', False, 'Show the traceback of input errors instead of one line.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.format in ENCODER_FORMATS:
    if f.out is None or f.workdir is not None:
      raise app.UsageError(f'--format={f.format} writes an encoder: give --out=DIR, not --workdir')
    options = {'heads': f.heads, 'activation': f.activation}
    errors.run_reporting_user_errors(
      lambda: convert_encoder(f.format, f.src, f.out, **options), f.verbose
    )
    return
  if f.heads is not None or f.activation is not None:
    raise app.UsageError('--heads and --activation apply to encoder formats only')
  if f.workdir is None or f.out is not None:
    raise app.UsageError(f'--format={f.format} writes a target: give --workdir=DIR, not --out')
  if f.format not in ('pytorch-ddpm', 'compvis-ldm') and f['weights'].present:
    raise app.UsageError('--weights applies to --format=pytorch-ddpm and compvis-ldm only')
  if f.format not in LATENT_FORMATS and f.scaling_factor is not None:
    raise app.UsageError(f'--scaling_factor applies to --format={"/".join(LATENT_FORMATS)} only')
  if f.format not in ('compvis-ldm', 'sd-single-file') and f.config is not None:
    raise app.UsageError('--config applies to --format=compvis-ldm and sd-single-file only')
  single = [n for n in ('original_config', 'tokenizer', 'no_ema') if f[n].present]
  if f.format != 'sd-single-file' and single:
    raise app.UsageError(f'--{single[0]} applies to --format=sd-single-file only')
  overrides = {
    k: getattr(f, k)
    for k in ('num_timesteps', 'beta_start', 'beta_end')
    if getattr(f, k) is not None
  }
  errors.run_reporting_user_errors(
    lambda: convert(
      f.format,
      f.src,
      f.workdir,
      weights=f.weights if f['weights'].present else None,
      resolution=f.resolution,
      diffusion=overrides,
      scaling_factor=f.scaling_factor,
      config=f.config,
      **(
        {'original_config': f.original_config, 'tokenizer': f.tokenizer, 'no_ema': f.no_ema}
        if f.format == 'sd-single-file'
        else {}
      ),
    ),
    f.verbose,
  )


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['format', 'src'])
  app.run(main, flags_parser=errors.flags_parser)
