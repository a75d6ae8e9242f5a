"""The training config of a CompVis latent-diffusion checkpoint (``--format=compvis-ldm``).

``configs/latent-diffusion/*.yaml`` of github.com/CompVis/latent-diffusion (YAML or JSON, the whole
file or its ``model.params``) gives what the weights do not store: the schedule, the scale factor,
the UNet's attention heads and the image size. ``architecture`` turns it into the diffusers
``UNet2DModel`` and ``VQModel`` configs the ``diffusers-ldm`` import reads (so both imports build
the same networks), refusing by name what those networks do not compute: scale-shift norms,
ResBlock resampling, spatial transformers, class or text conditioning, KL autoencoders, a head
width that varies between attention widths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from drc_jax.convert import diffusers as diffusers_lib
from drc_jax.convert import diffusers_ldm
from drc_jax.convert.common import ConversionError
from drc_jax.models import unet as model_lib
from drc_jax.models import vq as vq_lib

# CompVis make_beta_schedule name -> ours ('sqrt' is refused).
SCHEDULES = {'linear': 'scaled_linear', 'sqrt_linear': 'linear', 'cosine': 'cosine'}

UNET_DEFAULTS = {  # ldm.modules.diffusionmodules.openaimodel.UNetModel.__init__
  'image_size': None,
  'in_channels': None,
  'model_channels': None,
  'out_channels': None,
  'num_res_blocks': None,
  'attention_resolutions': None,
  'dropout': 0,
  'channel_mult': (1, 2, 4, 8),
  'conv_resample': True,
  'dims': 2,
  'num_classes': None,
  'use_checkpoint': False,
  'use_fp16': False,
  'num_heads': -1,
  'num_head_channels': -1,
  'num_heads_upsample': -1,
  'use_scale_shift_norm': False,
  'resblock_updown': False,
  'use_new_attention_order': False,
  'use_spatial_transformer': False,
  'transformer_depth': 1,
  'context_dim': None,
  'n_embed': None,
  'legacy': True,
}
UNET_REQUIRED = {
  'conv_resample': True,
  'dims': 2,
  'num_classes': None,
  'use_scale_shift_norm': False,
  'resblock_updown': False,
  'use_spatial_transformer': False,
  'n_embed': None,
}
DDCONFIG_DEFAULTS = {  # ldm.modules.diffusionmodules.model.Encoder / Decoder
  'ch': None,
  'out_ch': None,
  'ch_mult': (1, 2, 4, 8),
  'num_res_blocks': None,
  'attn_resolutions': None,
  'dropout': 0.0,
  'resamp_with_conv': True,
  'in_channels': None,
  'resolution': None,
  'z_channels': None,
  'double_z': True,
  'use_linear_attn': False,
  'attn_type': 'vanilla',
  'give_pre_end': False,
  'tanh_out': False,
}
DDCONFIG_REQUIRED = {
  'resamp_with_conv': True,
  'double_z': False,
  'use_linear_attn': False,
  'give_pre_end': False,
  'tanh_out': False,
}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the CompVis config says about the model (with the diffusers configs built from it)."""

  unet: model_lib.UNetConfig
  vq: vq_lib.VQConfig
  diffusion: dict[str, Any]  # our schedule settings, as found in the config
  scale_factor: float  # LatentDiffusion.scale_factor (1.0 unless set)
  num_head_channels: int
  num_heads: int
  new_attention_order: bool


# ----------------------------------------------------------------------------- the config


def read_config(path) -> dict[str, Any]:
  """``model.params`` of a CompVis training config (YAML or JSON; or that section alone)."""
  import yaml  # pylint: disable=g-import-not-at-top  (PyYAML comes with flax and ml_collections)

  path = epath.Path(path)
  if not path.exists():
    raise ConversionError(
      f'{path}: config not found; pass --config=CONFIG.yaml, the training config of the '
      f'checkpoint (the model zoo zips ship it as config.yaml beside model.ckpt)'
    )
  try:
    doc = yaml.safe_load(path.read_text())
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConversionError(f'{path}: not valid YAML or JSON ({e})') from e
  for key in ('model', 'params'):
    if isinstance(doc, dict) and isinstance(doc.get(key), dict) and 'unet_config' not in doc:
      doc = doc[key]
  if not isinstance(doc, dict) or 'unet_config' not in doc:
    raise ConversionError(
      f'{path}: expected a LatentDiffusion config (model.params with unet_config and '
      f'first_stage_config)'
    )
  return doc


def _params_of(section: Any, where: str) -> dict[str, Any]:
  if not isinstance(section, dict) or not isinstance(section.get('params', {}), dict):
    raise ConversionError(f'{where}: expected a mapping with params')
  return dict(section.get('params') or {})


_OPTIONAL = ('num_classes', 'context_dim', 'n_embed')  # None by default and allowed to stay None


def _fill(given: dict[str, Any], defaults: dict[str, Any], where: str) -> dict[str, Any]:
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConversionError(f'{where}: unsupported fields {unknown}')
  c = dict(defaults, **given)
  needed = [k for k, v in c.items() if v is None and defaults[k] is None and k not in _OPTIONAL]
  if needed:
    raise ConversionError(f'{where}: missing fields {needed}')
  return c


def _unet_heads(c: dict[str, Any], widths: list[int], where: str) -> int | None:
  """diffusers' attention_head_dim (None: one head) of openaimodel's head settings."""
  heads, head_ch, up = (
    int(c['num_heads']),
    int(c['num_head_channels']),
    int(c['num_heads_upsample']),
  )
  if head_ch != -1:
    if head_ch < 1 or any(w % head_ch for w in widths):
      raise ConversionError(
        f'{where}: num_head_channels={head_ch} must divide every attention width {widths}'
      )
    return head_ch
  if heads < 1:
    raise ConversionError(f'{where}: set num_heads or num_head_channels')
  if up not in (-1, heads):
    raise ConversionError(f'{where}: unsupported num_heads_upsample={up} (only -1 or num_heads)')
  dims = {w / heads for w in widths}
  if len(dims) != 1 or any(w % heads for w in widths):
    raise ConversionError(
      f'{where}: unsupported num_heads={heads}: the head width must be the same at every '
      f'attention width {widths} (set num_head_channels instead)'
    )
  return None if heads == 1 else int(dims.pop())


def architecture(
  params: dict[str, Any], where: str = 'config', resolution: int | None = None
) -> Architecture:
  """The UNet, autoencoder and schedule of a CompVis ``LatentDiffusion`` config's params.

  Args:
    params: ``model.params`` of the training config.
    where: the config file, for messages.
    resolution: image side; overrides unet_config's ``image_size`` times the VQ factor.

  Raises:
    ConversionError: naming the field drc_jax does not compute, or a value of the wrong type.
  """
  try:
    return _architecture(params, where, resolution)
  except ConversionError:
    raise
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise ConversionError(f'{where}: invalid LatentDiffusion config ({e!r})') from e


def _architecture(params: dict[str, Any], where: str, resolution: int | None) -> Architecture:
  refuse = lambda field, why: ConversionError(f'{where}: unsupported {field} ({why})')
  if params.get('parameterization', 'eps') != 'eps':
    raise refuse(f'parameterization={params["parameterization"]!r}', 'only eps')
  if params.get('given_betas') is not None:
    raise refuse('given_betas', 'give beta_schedule, linear_start and linear_end')
  cond = params.get('cond_stage_config', '__is_unconditional__')
  if cond != '__is_unconditional__' or params.get('conditioning_key') is not None:
    raise refuse('cond_stage_config', 'only unconditional LDMs (__is_unconditional__)')
  first = params.get('first_stage_config')
  target = first.get('target', 'VQModelInterface') if isinstance(first, dict) else None
  if not isinstance(target, str) or 'VQModel' not in target:
    raise refuse(f'first_stage_config.target={target!r}', 'only VQ autoencoders (VQModelInterface)')

  # The autoencoder: ddconfig -> diffusers VQModel config.
  fp = _params_of(first, f'{where}: first_stage_config')
  if fp.get('remap') is not None or fp.get('use_ema'):
    raise refuse('first_stage_config.params remap/use_ema', 'only a plain codebook')
  for key in ('embed_dim', 'n_embed', 'ddconfig'):
    if key not in fp:
      raise ConversionError(f'{where}: first_stage_config.params: missing {key}')
  dd_where = f'{where}: first_stage_config.params.ddconfig'
  dd = _fill(dict(fp['ddconfig'] or {}), DDCONFIG_DEFAULTS, dd_where)
  for field, value in DDCONFIG_REQUIRED.items():
    if bool(dd[field]) != value:
      raise refuse(f'ddconfig.{field}={dd[field]!r}', f'only {value!r}')
  if dd['attn_type'] not in ('vanilla', 'none'):
    raise refuse(f'ddconfig.attn_type={dd["attn_type"]!r}', "only 'vanilla' or 'none'")
  with_attn = dd['attn_type'] == 'vanilla'
  mult = [int(m) for m in dd['ch_mult']]
  attn = {int(r) for r in dd['attn_resolutions'] or ()} if with_attn else set()
  levels = [int(dd['resolution']) // 2**i in attn for i in range(len(mult))]
  vq_json = {
    'in_channels': int(dd['in_channels']),
    'out_channels': int(dd['out_ch']),
    'block_out_channels': [int(dd['ch']) * m for m in mult],
    'down_block_types': ['AttnDownEncoderBlock2D' if a else 'DownEncoderBlock2D' for a in levels],
    'up_block_types': ['AttnUpDecoderBlock2D' if a else 'UpDecoderBlock2D' for a in levels[::-1]],
    'layers_per_block': int(dd['num_res_blocks']),
    'latent_channels': int(dd['z_channels']),
    'num_vq_embeddings': int(fp['n_embed']),
    'vq_embed_dim': int(fp['embed_dim']),
    'norm_num_groups': 32,  # taming's Normalize: GroupNorm(32, eps=1e-6), as diffusers' VQModel
    'mid_block_add_attention': with_attn,
  }
  vq_cfg, _ = diffusers_ldm.vq_config(vq_json, dd_where)
  f = vq_cfg.downsampling_factor

  # The UNet: openaimodel params -> diffusers UNet2DModel config.
  u_where = f'{where}: unet_config.params'
  u = dict(_params_of(params.get('unet_config'), f'{where}: unet_config'))
  if u.get('image_size') is None and params.get('image_size') is not None:
    u['image_size'] = params['image_size']
  c = _fill(u, UNET_DEFAULTS, u_where)
  for field, value in UNET_REQUIRED.items():
    if c[field] != value:
      raise refuse(f'unet_config.params.{field}={c[field]!r}', f'only {value!r}')
  ch, mult = int(c['model_channels']), [int(m) for m in c['channel_mult']]
  ds = {int(d) for d in c['attention_resolutions']}
  attn_levels = [2**i in ds for i in range(len(mult))]
  widths = sorted({ch * m for m, a in zip(mult, attn_levels) if a} | {ch * mult[-1]})
  unet_json = {
    'sample_size': int(c['image_size']),
    'in_channels': int(c['in_channels']),
    'out_channels': int(c['out_channels']),
    'block_out_channels': [ch * m for m in mult],
    'down_block_types': ['AttnDownBlock2D' if a else 'DownBlock2D' for a in attn_levels],
    'up_block_types': ['AttnUpBlock2D' if a else 'UpBlock2D' for a in attn_levels[::-1]],
    'layers_per_block': int(c['num_res_blocks']),
    'attention_head_dim': _unet_heads(c, widths, u_where),
    'norm_num_groups': 32,  # GroupNorm32
    'norm_eps': 1e-5,
    'act_fn': 'silu',
    'flip_sin_to_cos': True,  # timestep_embedding: [cos, sin], frequencies over half
    'freq_shift': 0,
    'downsample_padding': 1,  # Downsample: conv stride 2, padding 1
  }
  if resolution is not None and resolution % f:
    raise ConversionError(f'--resolution={resolution} is not a multiple of the VQ factor {f}')
  unet_cfg = diffusers_lib.diffusers_config(
    unet_json, None if resolution is None else resolution // f, u_where
  )
  if unet_cfg.in_channels != vq_cfg.vq_embed_dim or unet_cfg.out_channels != vq_cfg.vq_embed_dim:
    raise ConversionError(
      f'{u_where}: in_channels={unet_cfg.in_channels}, out_channels={unet_cfg.out_channels} '
      f'must equal first_stage_config.params.embed_dim={vq_cfg.vq_embed_dim}'
    )

  # The schedule.
  kind = params.get('beta_schedule', 'linear')
  if kind not in SCHEDULES:
    raise refuse(f'beta_schedule={kind!r}', f'only {sorted(SCHEDULES)}')
  if kind == 'cosine' and float(params.get('cosine_s', 8e-3)) != 8e-3:
    raise refuse(f'cosine_s={params["cosine_s"]!r}', 'only 8e-3')
  diffusion = {
    'num_timesteps': int(params.get('timesteps', 1000)),
    'beta_schedule': SCHEDULES[kind],
    'beta_start': float(params.get('linear_start', 1e-4)),
    'beta_end': float(params.get('linear_end', 2e-2)),
  }
  scale = params.get('scale_factor', 1.0)
  try:  # PyYAML reads exponents without a dot (1e-1) as strings
    ok = float(scale) > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise refuse(f'scale_factor={scale!r}', 'a positive number')
  return Architecture(
    unet=unet_cfg,
    vq=vq_cfg,
    diffusion=diffusion,
    scale_factor=float(scale),
    num_head_channels=int(c['num_head_channels']),
    num_heads=int(c['num_heads']),
    new_attention_order=bool(c['use_new_attention_order']),
  )
