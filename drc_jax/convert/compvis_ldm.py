"""``compvis-ldm``: a latent diffusion target from an original CompVis latent-diffusion ``.ckpt``.

  python -m drc_jax.convert --format=compvis-ldm --src=models/ldm/ffhq256/model.ckpt \\
      --workdir=runs/ffhq_ldm [--config=models/ldm/ffhq256/config.yaml] [--weights=ema|net]

The checkpoint is the PyTorch Lightning file of a ``ldm.models.diffusion.ddpm.LatentDiffusion``
(the model zoo zips of github.com/CompVis/latent-diffusion hold ``model.ckpt`` and
``config.yaml``): a pickled dict whose ``state_dict`` (or the file itself, if it is a bare state
dict) holds

* ``model.diffusion_model.*``: the UNet (``ldm.modules.diffusionmodules.openaimodel.UNetModel``);
* ``model_ema.*``: its EMA copy when trained with ``use_ema`` (LitEma names: the parameter name
  without its dots, e.g. ``model_ema.diffusion_modelinput_blocks00weight``). The CompVis sampling
  script samples under ``ema_scope``, so the EMA weights are converted when present
  (``--weights=net`` takes ``model.diffusion_model.*``);
* ``first_stage_model.*``: the VQ autoencoder (``ldm.models.autoencoder.VQModelInterface``, the
  taming-transformers Encoder/Decoder and ``VectorQuantizer``);
* the schedule buffers of ``DDPM`` (``betas``, ``alphas_cumprod``, ...), checked against the
  config, and ``scale_factor`` when trained with ``scale_by_std``.

The file is read only with ``torch.load(weights_only=True)``. A full Lightning training checkpoint
also pickles Lightning objects (callbacks, hyper-parameters), which that refuses; re-save its state
dict once, where ``pytorch_lightning`` is installed and only for a file you trust:

  ckpt = torch.load('model.ckpt', map_location='cpu', weights_only=False)
  torch.save({'state_dict': ckpt['state_dict']}, 'model_state.ckpt')

What the weights do not store comes from the training config (``--config``; by default
``config.yaml`` beside the checkpoint), YAML or JSON with the layout of
``configs/latent-diffusion/*.yaml``: ``model.params`` gives the schedule (``timesteps``,
``beta_schedule``, ``linear_start``, ``linear_end``), ``scale_factor``, and ``unet_config.params``
(``image_size``: the latent side, ``model_channels``, ``channel_mult``, ``num_res_blocks``,
``attention_resolutions`` as downsampling factors, ``num_head_channels`` or ``num_heads``) and
``first_stage_config.params`` (``embed_dim``, ``n_embed``, ``ddconfig``). A config holding only
``model.params`` (or just its contents) is enough. CompVis' ``linear`` schedule is linear in
sqrt(beta) (our and diffusers' ``scaled_linear``), its ``sqrt_linear`` is our ``linear``.

The two networks are the ``diffusers-ldm`` ones (UNet2DModel, VQModel): their diffusers configs are
built from the CompVis one, and each parameter is read from the CompVis tensor that diffusers'
conversion scripts (scripts/convert_ldm_original_checkpoint_to_diffusers.py, and
``convert_ldm_vae_checkpoint`` for the autoencoder) would turn into its diffusers tensor: the
fused ``qkv`` 1-D convolution of each UNet attention block is split per head as
``QKVAttentionLegacy`` lays it out ([heads, 3, head width]), or ``QKVAttention``
([3, heads, head width]) with ``use_new_attention_order``. Messages name the CompVis keys
(``<qkv key>:q`` for the query part of a fused tensor).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from drc_jax.convert import diffusers as diffusers_lib
from drc_jax.convert import diffusers_ldm
from drc_jax.convert.common import (
  ConversionError,
  Converted,
  RefusedPickle,
  Source,
  assemble,
  assemble_tree,
  describe,
  diffusion_settings,
  read_checkpoint,
  state_dict,
)
from drc_jax.convert.compvis_config import Architecture, architecture, read_config
from drc_jax.core import schedule as schedule_lib
from drc_jax.models import unet as model_lib
from drc_jax.models import vq as vq_lib

UNET_PREFIX = 'model.diffusion_model.'
EMA_PREFIX = 'model_ema.'
VQ_PREFIX = 'first_stage_model.'
# Keys a LatentDiffusion state dict may hold besides the networks: not converted.
SCHEDULE_BUFFERS = (
  'betas',
  'alphas_cumprod',
  'alphas_cumprod_prev',
  'sqrt_alphas_cumprod',
  'sqrt_one_minus_alphas_cumprod',
  'log_one_minus_alphas_cumprod',
  'sqrt_recip_alphas_cumprod',
  'sqrt_recipm1_alphas_cumprod',
  'posterior_variance',
  'posterior_log_variance_clipped',
  'posterior_mean_coef1',
  'posterior_mean_coef2',
)
BETAS_TOL = 1e-6  # stored float32 betas vs the config's schedule
OTHER_KEYS = ('model_ema.decay', 'model_ema.num_updates', 'scale_factor', 'logvar', 'cond_ids')


# ----------------------------------------------------------------------------- key mapping

_RESNET = {  # diffusers ResnetBlock2D -> openaimodel ResBlock
  'norm1': 'in_layers.0',
  'conv1': 'in_layers.2',
  'time_emb_proj': 'emb_layers.1',
  'norm2': 'out_layers.0',
  'conv2': 'out_layers.3',
  'conv_shortcut': 'skip_connection',
}
_UNET_TOP = {
  'time_embedding.linear_1': 'time_embed.0',
  'time_embedding.linear_2': 'time_embed.2',
  'conv_in': 'input_blocks.0.0',
  'conv_norm_out': 'out.0',
  'conv_out': 'out.2',
}
# diffusers Attention -> openaimodel AttentionBlock (q, k, v: parts of the fused qkv).
_UNET_ATTN = {
  'group_norm': 'norm',
  'to_q': 'qkv:q',
  'to_k': 'qkv:k',
  'to_v': 'qkv:v',
  'to_out.0': 'proj_out',
}
# diffusers Attention -> taming AttnBlock.
_VQ_ATTN = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}


def _attention(prefix: str, rest: str, names: dict[str, str]) -> str:
  module, leaf = rest.rsplit('.', 1)
  name, _, part = names[module].partition(':')
  return f'{prefix}.{name}.{leaf}' + (f':{part}' if part else '')


def _resnet(prefix: str, rest: str, names: dict[str, str]) -> str:
  module, leaf = rest.rsplit('.', 1)
  return f'{prefix}.{names[module]}.{leaf}'


def unet_key(key: str, cfg: model_lib.UNetConfig) -> str:
  """The openaimodel UNetModel tensor (key without ``model.diffusion_model.``) of a diffusers
  UNet2DModel tensor, as scripts/convert_ldm_original_checkpoint_to_diffusers.py pairs them."""
  nrb, levels = cfg.num_res_blocks, len(cfg.ch_mult)
  module, leaf = key.rsplit('.', 1)
  if module in _UNET_TOP:
    return f'{_UNET_TOP[module]}.{leaf}'
  if m := re.fullmatch(r'down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)', key):
    return _resnet(f'input_blocks.{1 + int(m[1]) * (nrb + 1) + int(m[2])}.0', m[3], _RESNET)
  if m := re.fullmatch(r'down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)', key):
    return _attention(f'input_blocks.{1 + int(m[1]) * (nrb + 1) + int(m[2])}.1', m[3], _UNET_ATTN)
  if m := re.fullmatch(r'down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)', key):
    return f'input_blocks.{1 + int(m[1]) * (nrb + 1) + nrb}.0.op.{m[2]}'
  if m := re.fullmatch(r'mid_block\.resnets\.(\d)\.(.+)', key):
    return _resnet(f'middle_block.{2 * int(m[1])}', m[2], _RESNET)
  if m := re.fullmatch(r'mid_block\.attentions\.0\.(.+)', key):
    return _attention('middle_block.1', m[1], _UNET_ATTN)
  if m := re.fullmatch(r'up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)', key):
    return _resnet(f'output_blocks.{int(m[1]) * (nrb + 1) + int(m[2])}.0', m[3], _RESNET)
  if m := re.fullmatch(r'up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)', key):
    return _attention(f'output_blocks.{int(m[1]) * (nrb + 1) + int(m[2])}.1', m[3], _UNET_ATTN)
  if m := re.fullmatch(r'up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)', key):
    # output_blocks.i = [ResBlock, (AttentionBlock), Upsample]: Upsample is 2 after attention.
    with_attn = cfg.resolution // 2 ** (levels - 1 - int(m[1])) in cfg.attn_res
    return f'output_blocks.{int(m[1]) * (nrb + 1) + nrb}.{2 if with_attn else 1}.conv.{m[2]}'
  raise AssertionError(f'no openaimodel name for {key}')


def vq_key(key: str, levels: int) -> str:
  """The taming VQModel tensor (key without ``first_stage_model.``) of a diffusers VQModel tensor,
  as diffusers' ``convert_ldm_vae_checkpoint`` pairs them (decoder levels run the other way)."""
  if key in ('quant_conv.weight', 'quant_conv.bias', 'quantize.embedding.weight') or key.startswith(
    'post_quant_conv.'
  ):
    return key
  side, rest = key.split('.', 1)
  module, leaf = rest.rsplit('.', 1)
  if module in ('conv_in', 'conv_out', 'conv_norm_out'):
    return f'{side}.{module.replace("conv_norm_out", "norm_out")}.{leaf}'
  if m := re.fullmatch(r'mid_block\.resnets\.(\d)\.(.+)', rest):
    return f'{side}.mid.block_{int(m[1]) + 1}.{m[2]}'.replace('conv_shortcut', 'nin_shortcut')
  if m := re.fullmatch(r'mid_block\.attentions\.0\.(.+)', rest):
    return _attention(f'{side}.mid.attn_1', m[1], _VQ_ATTN)
  if m := re.fullmatch(r'(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)', rest):
    level = int(m[2]) if m[1] == 'down' else levels - 1 - int(m[2])
    prefix = f'{side}.{m[1]}.{level}.{"block" if m[3] == "resnets" else "attn"}.{m[4]}'
    if m[3] == 'attentions':
      return _attention(prefix, m[5], _VQ_ATTN)
    return f'{prefix}.{m[5]}'.replace('conv_shortcut', 'nin_shortcut')
  if m := re.fullmatch(r'(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(\w+)', rest):
    level = int(m[2]) if m[1] == 'down' else levels - 1 - int(m[2])
    return f'{side}.{m[1]}.{level}.{m[3]}sample.conv.{m[4]}'
  raise AssertionError(f'no taming name for {key}')


def unet_sources(arch: Architecture) -> dict[str, Source]:
  """Our UNet parameter name -> its openaimodel tensor (attention weights: 1-D convolutions)."""
  out = {}
  for name, s in diffusers_lib.diffusers_sources(arch.unet).items():
    key = unet_key(s.key, arch.unet)
    attn = key.partition(':')[0].endswith(('.qkv.weight', '.proj_out.weight'))
    out[name] = Source(key, 'conv1d1' if attn else s.kind)
  return out


def vq_sources(arch: Architecture) -> dict[str, Source]:
  """Our autoencoder parameter name -> its taming tensor (attention weights: 1x1 convolutions,
  the only Linear layers of diffusers' VQModel)."""
  _, abstract = vq_lib.abstract_autoencoder(arch.vq)
  levels = len(arch.vq.block_out_channels)
  return {
    name: Source(vq_key(s.key, levels), 'conv1x1' if s.kind == 'linear' else s.kind)
    for name, s in diffusers_ldm.vq_sources(abstract).items()
  }


def split_qkv(state: dict[str, np.ndarray], arch: Architecture) -> dict[str, np.ndarray]:
  """``state`` with each fused ``*.qkv.weight|bias`` [3C, ...] replaced by its ``:q``, ``:k``,
  ``:v`` parts [C, ...], per head as openaimodel's attention reads them."""
  out = {}
  for key, v in state.items():
    width = v.shape[0] // 3 if v.ndim else 0
    if not key.endswith(('.qkv.weight', '.qkv.bias')) or not width or v.shape[0] != 3 * width:
      out[key] = v
      continue
    heads = width // arch.num_head_channels if arch.num_head_channels > 0 else arch.num_heads
    if heads < 1 or width % heads:
      out[key] = v  # left whole: reported as unexpected, its parts as missing
      continue
    rest = v.shape[1:]
    if arch.new_attention_order:  # QKVAttention: q, k, v = qkv.chunk(3)
      parts = v.reshape((3, width) + rest)
    else:  # QKVAttentionLegacy: qkv.reshape(heads, 3 * head width, ...).split(head width)
      parts = v.reshape((heads, 3, width // heads) + rest).swapaxes(0, 1).reshape((3, width) + rest)
    for i, part in enumerate('qkv'):
      out[f'{key}:{part}'] = np.ascontiguousarray(parts[i])
  return out


# ----------------------------------------------------------------------------- reading


RESAVE_HINT = (
  're-save its state dict once, with pytorch_lightning installed and only for a file you trust: '
  "ckpt = torch.load(SRC, map_location='cpu', weights_only=False); "
  "torch.save({'state_dict': ckpt['state_dict']}, 'model_state.ckpt'); then convert "
  'model_state.ckpt'
)


def read_state(src: epath.Path) -> tuple[dict[str, np.ndarray], int]:
  """(state dict as float32 numpy arrays, Lightning's global_step or 0) of a CompVis ``.ckpt``."""
  try:
    obj = read_checkpoint(src)
  except RefusedPickle as e:
    why = 'a full PyTorch Lightning training checkpoint: ' if 'lightning' in str(e) else ''
    raise ConversionError(
      f'{e}. If it is {why or "a Lightning checkpoint: "}'
      + RESAVE_HINT.replace('SRC', repr(str(src)))
    ) from e
  step = 0
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    gs = obj.get('global_step', 0)
    step = gs if isinstance(gs, int) and gs >= 0 else 0
    obj = obj['state_dict']
  return state_dict(obj, str(src)), step


def _groups(state: dict[str, np.ndarray], where: str) -> tuple[dict, dict, dict]:
  """(UNet, EMA, autoencoder) parts of a LatentDiffusion state dict; other keys are refused."""
  net = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
  ema = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX) and k not in OTHER_KEYS}
  vq = {k[len(VQ_PREFIX) :]: v for k, v in state.items() if k.startswith(VQ_PREFIX)}
  known = (UNET_PREFIX, EMA_PREFIX, VQ_PREFIX)
  rest = [k for k in state if not k.startswith(known) and k not in SCHEDULE_BUFFERS + OTHER_KEYS]
  if rest:
    cond = any(k.startswith('cond_stage_model.') for k in rest)
    raise ConversionError(
      f'{where}: unexpected keys {describe(rest)}'
      + ('; cond_stage_model.*: a conditional LDM (only unconditional ones are supported)' * cond)
    )
  if not vq:
    raise ConversionError(f'{where}: no first_stage_model.* weights (the VQ autoencoder)')
  return net, ema, vq


def unet_state(
  net: dict, ema: dict, expected: set[str], weights: str | None, where: str
) -> tuple[dict[str, np.ndarray], str]:
  """The UNet tensors to convert (keys without prefix) and where they come from, for messages.

  ``weights``: 'ema' (``model_ema.*``), 'net' (``model.diffusion_model.*``) or None (EMA when
  the checkpoint holds it, as CompVis samples under ema_scope). ``expected``: the dotted keys
  wanted, which name the EMA tensors (LitEma drops the dots).
  """
  if weights not in (None, 'ema', 'net'):
    raise ConversionError(f"weights={weights!r}: expected 'ema' or 'net'")
  if weights is None:
    weights = 'ema' if ema else 'net'
  if weights == 'net':
    if not net:
      raise ConversionError(f'{where}: no {UNET_PREFIX}* weights')
    return net, f'{where} ({UNET_PREFIX}*)'
  if not ema:
    raise ConversionError(f'{where}: no {EMA_PREFIX}* weights (trained without use_ema); use net')
  flat: dict[str, list[str]] = {}
  for key in sorted(expected):
    flat.setdefault(EMA_PREFIX + ('diffusion_model.' + key).replace('.', ''), []).append(key)
  clash = [keys for keys in flat.values() if len(keys) > 1]
  if clash:
    raise ConversionError(f'{where}: EMA names are ambiguous without dots: {clash[:3]}')
  return {flat[k][0] if k in flat else k: v for k, v in ema.items()}, f'{where} ({EMA_PREFIX}*)'


def _check_betas(betas, diffusion: dict[str, Any], where: str, config: str) -> None:
  """The ``betas`` buffer of the checkpoint (float32) against the schedule we will record."""
  if betas is None:
    return
  want = schedule_lib.make_schedule(diffusion).betas
  got = np.asarray(betas, np.float64).reshape(-1)
  err = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
  if not err <= BETAS_TOL:
    raise ConversionError(
      f'{where}: its betas buffer (T={got.size}, {got[0]:.6g}..{got[-1]:.6g}) is not the '
      f'schedule of {config} {diffusion} (max |diff| {err:.3g}); fix the config'
    )


def convert_compvis_ldm(
  src,
  config=None,
  resolution: int | None = None,
  diffusion: dict[str, Any] | None = None,
  scaling_factor: float | None = None,
  weights: str | None = None,
) -> Converted:
  """Reads a CompVis latent-diffusion ``.ckpt`` into a latent target (as ``diffusers-ldm``).

  Args:
    src: the checkpoint (``.ckpt``/``.pt``/``.pth``/``.bin``/``.safetensors``).
    config: its training config (YAML or JSON); default ``config.yaml`` beside ``src``.
    resolution: image side; overrides unet_config's ``image_size`` times the VQ factor.
    diffusion: explicit schedule settings; each must agree with the config.
    scaling_factor: overrides the checkpoint's ``scale_factor`` buffer and the config's.
    weights: 'ema', 'net' or None (EMA when present); see ``unet_state``.

  Returns:
    The converted target, for ``write_target``.
  """
  src = epath.Path(src)
  config_path = epath.Path(config) if config is not None else src.parent / 'config.yaml'
  arch = architecture(read_config(config_path), str(config_path), resolution)
  state, step = read_state(src)
  where = str(src)
  net, ema, vq = _groups(state, where)

  sources = unet_sources(arch)
  expected = {s.key.partition(':')[0] for s in sources.values()}
  unet, unet_where = unet_state(net, ema, expected, weights, where)
  params = assemble(arch.unet, sources, split_qkv(unet, arch), unet_where)
  _, abstract = vq_lib.abstract_autoencoder(arch.vq)
  vq_params = assemble_tree(
    abstract, vq_sources(arch), vq, f'{where} ({VQ_PREFIX}*)', f'VQ autoencoder {arch.vq}'
  )
  settings = diffusion_settings(arch.diffusion, diffusion, str(config_path))
  _check_betas(state.get('betas'), settings, where, str(config_path))

  if scaling_factor is not None:
    if not scaling_factor > 0:
      raise ConversionError(f'--scaling_factor={scaling_factor} must be positive')
    scaling = float(scaling_factor)
  elif 'scale_factor' in state:  # trained with scale_by_std: the buffer holds the value used
    scaling = float(np.asarray(state['scale_factor']).reshape(()))
  else:
    scaling = arch.scale_factor
  logging.info('%s: UNet from %s, scaling factor %s', where, unet_where, scaling)
  r, f, c = arch.unet.resolution, arch.vq.downsampling_factor, arch.vq.vq_embed_dim
  latent = {
    'autoencoder': 'autoencoder',
    'latent_shape': [r, r, c],
    'image_shape': [r * f, r * f, arch.vq.out_channels],
    'downsampling_factor': f,
    'scaling_factor': scaling,
  }
  return Converted(
    arch.unet,
    params,
    settings,
    f'compvis-ldm:{src}',
    step,
    autoencoder=(arch.vq, vq_params),
    latent=latent,
  )
