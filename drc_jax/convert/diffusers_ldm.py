"""``diffusers-ldm``: a latent diffusion target from a diffusers ``LDMPipeline`` folder.

  python -m drc_jax.convert --format=diffusers-ldm --src=ldm-pipeline --workdir=runs/ffhq_ldm

The folder holds ``vqvae/`` (a ``VQModel``: ``config.json`` + ``diffusion_pytorch_model``
``.safetensors`` or ``.bin``), ``unet/`` (a ``UNet2DModel`` on latents, read as the ``diffusers``
format reads it, multi-head attention included) and ``scheduler/scheduler_config.json`` (required:
latent models use their own schedules, e.g. the CompVis LDMs' ``scaled_linear`` 0.0015..0.0195,
so DDPM's default would be wrong). The workdir gets the UNet as an ordinary target, the
autoencoder in ``W/autoencoder/`` and a ``latent`` section in ``model.json``:

* ``latent_shape`` ``[h, w, c]``: the UNet's ``sample_size`` and channels (= the codebook width);
* ``image_shape`` ``[H, W, 3]`` and ``downsampling_factor`` ``f = 2 ** (levels - 1)`` of the VQ;
* ``scaling_factor``: ``vqvae/config.json``'s ``scaling_factor``. ``LDMPipeline`` samples latents
  ``z`` and decodes ``z / scaling_factor``, so the UNet works on ``scaling_factor * encode(x)``.
  When the config has none, diffusers falls back to ``VQModel``'s default 0.18215 (the Stable
  Diffusion KL value), which is wrong for the CompVis VQ models: ``LatentDiffusion`` trained them
  with ``scale_factor=1.0`` (diffusers issue #6725: CompVis/ldm-celebahq-256 samples are garbage
  with 0.18215). We record 1.0 then, and ``scaling_factor=...`` (``--scaling_factor``) overrides
  either value.

Every check of the ``diffusers`` format applies to both models: each parameter from exactly one
tensor of the expected shape, every tensor used, an unsupported config field refused by name
(``norm_type='spatial'``, the MoVQ decoder, is one).
"""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath

from drc_jax.convert import diffusers as diffusers_lib
from drc_jax.convert.common import (
  ConversionError,
  Converted,
  Source,
  assemble,
  assemble_tree,
  diffusion_settings,
  leaf_source,
  read_checkpoint,
  split_name,
  state_dict,
)
from drc_jax.core import records
from drc_jax.models import unet as model_lib
from drc_jax.models import vq as vq_lib

VQ_DEFAULTS = {  # diffusers 0.42 VQModel.__init__
  'in_channels': 3,
  'out_channels': 3,
  'down_block_types': ('DownEncoderBlock2D',),
  'up_block_types': ('UpDecoderBlock2D',),
  'block_out_channels': (64,),
  'layers_per_block': 1,
  'act_fn': 'silu',
  'latent_channels': 3,
  'sample_size': 32,
  'num_vq_embeddings': 256,
  'norm_num_groups': 32,
  'vq_embed_dim': None,
  'scaling_factor': None,  # absent: see the module docstring
  'norm_type': 'group',
  'mid_block_add_attention': True,
  'lookup_from_codebook': False,  # only used by decode(force_not_quantize=True)
  'force_upcast': False,  # a float16 hint; we compute in the config's dtype (float32)
}
DIFFUSERS_DEFAULT_SCALING = 0.18215


# CompVis ffhq-ldm-vq-4 (configs/latent-diffusion/ffhq-ldm-vq-4.yaml: the paper's FFHQ target)
# in diffusers' terms: VQ ch 128, ch_mult (1, 2, 4), 2 res blocks, no attention but the middle's,
# z 3, an 8192 x 3 codebook; UNet on 64x64x3, model_channels 224, channel_mult (1, 2, 3, 4),
# attention at downsampling 2, 4, 8, num_head_channels 32, 2 res blocks. The one definition the
# tests, the CompVis conversion checks and launch/bench_ldm.py use.
FFHQ_LDM_VQ4 = {
  'vq': dict(
    block_out_channels=(128, 256, 512),
    down_block_types=('DownEncoderBlock2D',) * 3,
    up_block_types=('UpDecoderBlock2D',) * 3,
    layers_per_block=2,
    latent_channels=3,
    num_vq_embeddings=8192,
    vq_embed_dim=3,
    norm_num_groups=32,
  ),
  'unet': dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(224, 448, 672, 896),
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    attention_head_dim=32,
    layers_per_block=2,
    norm_num_groups=32,
  ),
}


def vq_config(config: dict[str, Any], where: str = 'vqvae/config.json') -> tuple[Any, float | None]:
  """(VQConfig, recorded scaling_factor or None) of a diffusers ``VQModel`` config.

  Raises:
    ConversionError: naming the field our autoencoder does not compute.
  """
  c = records.diffusers_config(config, 'VQModel', VQ_DEFAULTS, where, ConversionError)
  if c['norm_type'] != 'group':
    raise ConversionError(
      f"{where}: unsupported norm_type={c['norm_type']!r} (only 'group'; 'spatial' is the MoVQ "
      f'decoder, conditioned on the quantised latents)'
    )
  if c['act_fn'] not in ('silu', 'swish'):
    raise ConversionError(f"{where}: unsupported act_fn={c['act_fn']!r} (only 'silu')")
  scaling = c['scaling_factor']
  if scaling is not None and not (isinstance(scaling, (int, float)) and scaling > 0):
    raise ConversionError(f'{where}: unsupported scaling_factor={scaling!r} (a positive number)')
  try:
    cfg = vq_lib.VQConfig(
      in_channels=int(c['in_channels']),
      out_channels=int(c['out_channels']),
      block_out_channels=tuple(c['block_out_channels']),
      down_block_types=tuple(c['down_block_types']),
      up_block_types=tuple(c['up_block_types']),
      layers_per_block=int(c['layers_per_block']),
      latent_channels=int(c['latent_channels']),
      num_vq_embeddings=int(c['num_vq_embeddings']),
      vq_embed_dim=int(c['vq_embed_dim'] or c['latent_channels']),
      norm_num_groups=int(c['norm_num_groups']),
      mid_block_add_attention=bool(c['mid_block_add_attention']),
    )
  except (TypeError, ValueError) as e:
    raise ConversionError(f'{where}: unsupported architecture ({e})') from e
  return cfg, None if scaling is None else float(scaling)


_VQ_RENAMES = (  # our module path piece -> diffusers'
  ('.downsample.conv', '.downsamplers.0.conv'),
  ('.upsample.conv', '.upsamplers.0.conv'),
  ('.to_out', '.to_out.0'),
)


def vq_sources(abstract) -> dict[str, Source]:
  """Our autoencoder parameter name -> its diffusers ``VQModel`` state-dict tensor."""
  out = {}
  for name, shape in model_lib.flat_param_shapes(abstract).items():
    if name == 'quantize.embedding':
      out[name] = Source('quantize.embedding.weight', 'vector')
      continue
    module, leaf = split_name(name)
    for ours, theirs in _VQ_RENAMES:
      module = module.replace(ours, theirs)
    out[name] = leaf_source(module, leaf, 'conv' if len(shape) == 4 else 'linear')
  return out


def _weights(folder: epath.Path) -> epath.Path:
  for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'):
    if (folder / name).exists():
      return folder / name
  raise ConversionError(
    f'{folder}: no diffusion_pytorch_model.safetensors or .bin (sharded checkpoints are not '
    f'supported)'
  )


def _read_autoencoder(folder: epath.Path) -> tuple[vq_lib.VQConfig, Any, float | None]:
  cfg, scaling = vq_config(
    records.read_json(folder / 'config.json', ConversionError), str(folder / 'config.json')
  )
  path = _weights(folder)
  where = str(path)
  state = diffusers_lib.rename_deprecated_attention(state_dict(read_checkpoint(path), where))
  _, abstract = vq_lib.abstract_autoencoder(cfg)
  params = assemble_tree(abstract, vq_sources(abstract), state, where, f'VQ autoencoder {cfg}')
  return cfg, params, scaling


def convert_diffusers_ldm(
  src,
  resolution: int | None = None,
  diffusion: dict[str, Any] | None = None,
  scaling_factor: float | None = None,
) -> Converted:
  """Reads a diffusers ``LDMPipeline`` folder into a latent target (UNet, autoencoder, latent).

  Args:
    src: the pipeline folder (``vqvae/``, ``unet/``, ``scheduler/``).
    resolution: image side; overrides the UNet's ``sample_size`` times the downsampling factor.
    diffusion: explicit schedule settings; each must agree with ``scheduler_config.json``.
    scaling_factor: overrides the recorded scaling factor (see the module docstring).

  Returns:
    The converted target, for ``write_target``.
  """
  src = epath.Path(src)
  if not src.is_dir():
    raise ConversionError(f'{src}: not a folder (expected a diffusers LDMPipeline folder)')
  for part in ('vqvae', 'unet', 'scheduler'):
    if not (src / part).is_dir():
      raise ConversionError(
        f'{src / part}: missing; an LDMPipeline folder holds vqvae/, unet/ and scheduler/'
      )
  sched = src / 'scheduler' / 'scheduler_config.json'
  if not sched.exists():
    raise ConversionError(f'{sched}: not found (a latent model needs its schedule recorded)')

  vq_cfg, vq_params, recorded = _read_autoencoder(src / 'vqvae')
  f = vq_cfg.downsampling_factor
  if resolution is not None and resolution % f:
    raise ConversionError(f'--resolution={resolution} is not a multiple of the VQ factor {f}')
  unet_json = src / 'unet' / 'config.json'
  unet_cfg = diffusers_lib.diffusers_config(
    records.read_json(unet_json, ConversionError),
    None if resolution is None else resolution // f,
    str(unet_json),
  )
  c = vq_cfg.vq_embed_dim
  if unet_cfg.in_channels != c or unet_cfg.out_channels != c:
    raise ConversionError(
      f'{unet_json}: in_channels={unet_cfg.in_channels}, out_channels={unet_cfg.out_channels} '
      f'must equal the latent width of vqvae/config.json (vq_embed_dim or latent_channels: {c})'
    )
  unet_weights = _weights(src / 'unet')
  where = str(unet_weights)
  state = diffusers_lib.rename_deprecated_attention(
    state_dict(read_checkpoint(unet_weights), where)
  )
  params = assemble(unet_cfg, diffusers_lib.diffusers_sources(unet_cfg), state, where)
  found, sched_path = diffusers_lib.scheduler_settings(unet_weights)

  if scaling_factor is not None:
    if not scaling_factor > 0:
      raise ConversionError(f'--scaling_factor={scaling_factor} must be positive')
    scaling = float(scaling_factor)
  elif recorded is None:
    scaling = 1.0
    logging.warning(
      '%s records no scaling_factor: using 1.0 (the CompVis VQ LDMs; diffusers would use '
      '%s); pass --scaling_factor to choose',
      src / 'vqvae' / 'config.json',
      DIFFUSERS_DEFAULT_SCALING,
    )
  else:
    scaling = recorded
    if recorded == DIFFUSERS_DEFAULT_SCALING:
      logging.warning(
        '%s records scaling_factor=%s, the diffusers default for KL autoencoders; the CompVis '
        'VQ LDMs were trained with 1.0 (pass --scaling_factor=1.0 if this is one of them)',
        src / 'vqvae' / 'config.json',
        recorded,
      )
  r = unet_cfg.resolution
  latent = {
    'autoencoder': 'autoencoder',
    'latent_shape': [r, r, c],
    'image_shape': [r * f, r * f, vq_cfg.out_channels],
    'downsampling_factor': f,
    'scaling_factor': scaling,
  }
  return Converted(
    unet_cfg,
    params,
    diffusion_settings(found, diffusion, sched_path),
    f'diffusers-ldm:{src}',
    autoencoder=(vq_cfg, vq_params),
    latent=latent,
  )
