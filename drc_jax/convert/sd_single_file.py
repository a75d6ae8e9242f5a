"""``sd-single-file``: a Stable Diffusion target from one checkpoint in the original CompVis /
Stability ("LDM") layout: SD 1.x, 2.x (v-prediction) and the 9-channel inpainting models.

  python -m drc_jax.convert --format=sd-single-file --src=v1-5-pruned-emaonly.safetensors \
      --original_config=v1-inference.yaml --tokenizer=sd15/tokenizer --workdir=runs/sd15
  python -m drc_jax.convert --format=sd-single-file --src=v2-1_768-ema-pruned.ckpt \
      --config=stable-diffusion-2-1 --workdir=runs/sd21

``--src``: ``.safetensors``, or ``.ckpt`` read by ``torch.load(weights_only=True)`` (no code runs;
``compvis_ldm.read_state``), a state dict bare or under ``state_dict``. Its keys:
``model.diffusion_model.*`` (openaimodel ``UNetModel`` with ``SpatialTransformer`` blocks) or its
LitEma copy ``model_ema.*`` (converted when present, ``--no_ema``: the raw weights; the other copy
must name the same tensors); ``first_stage_model.*`` (the KL autoencoder);
``cond_stage_model.transformer.*`` (SD 1.x: transformers' ``CLIPTextModel``) or
``cond_stage_model.model.*`` (SD 2.x: OpenCLIP's text tower, fused ``attn.in_proj_weight``; with
the ``penultimate`` layer its last resblock is checked present and dropped, as diffusers' SD 2
``text_encoder`` has 23 of 24 layers). Not converted: the schedule buffers (``betas`` checked
against the schedule), ``model_ema.decay``/``num_updates``, ``scale_factor`` (the latent scaling
when present), ``position_ids``, OpenCLIP's ``text_projection`` and ``logit_scale``. Each parameter
comes from the original tensor diffusers' ``single_file_utils`` turns into its diffusers tensor,
through the strict importers' key lists (``sd_unet``, ``sd_vae``, ``sd_text``): one tensor of the
expected shape per parameter, every tensor used, or a ``ConversionError`` naming the file and the
original key (``<in_proj key>:q`` for a part of a fused tensor).

The configuration: ``--original_config``, the original inference YAML (``v1-inference.yaml``,
``v2-inference-v.yaml``, ``v1-inpainting-inference.yaml``: ``unet_config``, ``ddconfig``,
``cond_stage_config`` (``FrozenCLIPEmbedder``: QuickGELU; ``FrozenOpenCLIPEmbedder``: GELU, its
``layer``), the schedule (CompVis' ``linear`` is our ``scaled_linear``), ``parameterization``
(``v``: v-prediction), ``scale_factor``; the text tower's sizes come from the weights, its heads
are width / 64 as in every CLIP text tower SD uses) with ``--tokenizer=DIR`` (nothing is
downloaded); or ``--config``, a diffusers pipeline folder whose ``unet``, ``vae``, ``text_encoder``
configs, ``tokenizer/`` and scheduler describe the model (read as ``diffusers_sd`` reads them).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from drc_jax.convert import compvis_config, compvis_ldm, diffusers_ldm, diffusers_sd, sd_text
from drc_jax.convert.common import (
  ConversionError,
  Source,
  assemble_tree,
  describe,
  diffusion_settings,
)
from drc_jax.convert.sd_unet import sd_unet_sources
from drc_jax.convert.sd_vae import kl_config
from drc_jax.core import records
from drc_jax.models import autoencoder_kl as kl_lib
from drc_jax.models import clip_text, clip_tokenizer, unet_cond
from drc_jax.targets import sd

UNET = compvis_ldm.UNET_PREFIX  # 'model.diffusion_model.'
EMA = compvis_ldm.EMA_PREFIX  # 'model_ema.'
VAE = compvis_ldm.VQ_PREFIX  # 'first_stage_model.'
CLIP = 'cond_stage_model.transformer.'  # SD 1.x: transformers CLIPTextModel
OPEN_CLIP = 'cond_stage_model.model.'  # SD 2.x: OpenCLIP's text tower
IGNORED = (
  compvis_ldm.SCHEDULE_BUFFERS
  + compvis_ldm.OTHER_KEYS
  + tuple(CLIP + b for b in sd_text.BUFFERS)
  + (OPEN_CLIP + 'text_projection', OPEN_CLIP + 'logit_scale')
)
HEAD_WIDTH = 64  # CLIP text towers' head width (ViT-L/14: 768 / 12, ViT-H/14: 1024 / 16)
PREDICTIONS = {'eps': 'epsilon', 'v': 'v_prediction'}
ENCODERS = {'FrozenCLIPEmbedder': 'clip', 'FrozenOpenCLIPEmbedder': 'open_clip'}

# openaimodel.UNetModel's and the KL Encoder/Decoder's fields: (default, the value SD's networks
# must have: None any, 'absent' None or False). Another field is refused by name.
UNET_FIELDS = {
  'image_size': (None, None), 'in_channels': (None, None), 'model_channels': (None, None),
  'out_channels': (None, None), 'num_res_blocks': (None, None), 'dropout': (0, None),
  'attention_resolutions': (None, None), 'channel_mult': ((1, 2, 4, 8), None),
  'conv_resample': (True, True), 'dims': (2, 2), 'num_classes': (None, 'absent'),
  'use_checkpoint': (False, None), 'use_fp16': (False, None), 'use_bf16': (False, None),
  'num_heads': (-1, None), 'num_head_channels': (-1, None),
  'num_heads_upsample': (-1, None), 'use_new_attention_order': (False, None),  # not read by SD
  'use_scale_shift_norm': (False, False), 'resblock_updown': (False, False),
  'use_spatial_transformer': (False, True), 'transformer_depth': (1, None),
  'context_dim': (None, None), 'n_embed': (None, 'absent'), 'legacy': (True, None),
  'disable_self_attentions': (None, 'absent'), 'num_attention_blocks': (None, 'absent'),
  'disable_middle_self_attn': (False, False), 'use_linear_in_transformer': (False, None),
  'adm_in_channels': (None, 'absent'),
}  # fmt: skip
DDCONFIG_FIELDS = {
  'ch': (None, None), 'out_ch': (None, None), 'ch_mult': ((1, 2, 4, 8), None),
  'num_res_blocks': (None, None), 'attn_resolutions': (None, None), 'dropout': (0.0, None),
  'resamp_with_conv': (True, True), 'in_channels': (None, None), 'resolution': (None, None),
  'z_channels': (None, None), 'double_z': (True, True), 'use_linear_attn': (False, False),
  'attn_type': ('vanilla', None), 'give_pre_end': (False, False), 'tanh_out': (False, False),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
  """What the configuration says (``text`` None: read from the weights with ``encoder``)."""

  unet: unet_cond.UNetCondConfig
  vae: kl_lib.AutoencoderKLConfig
  text: clip_text.CLIPTextConfig | None
  encoder: str | None  # 'clip' or 'open_clip' (None: from the keys)
  penultimate: bool | None  # the SD 2.x text layer (None: from the layer counts)
  diffusion: dict[str, Any]
  prediction_type: str
  pipeline: str
  tokenizer: epath.Path | None
  where: str


def _fields(given: Any, fields: dict[str, tuple[Any, Any]], where: str) -> dict[str, Any]:
  """``given`` with defaults filled; an unknown, missing or unsupported field refused by name."""
  if not isinstance(given, dict):
    raise ConversionError(f'{where}: expected a mapping, found {type(given).__name__}')
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ConversionError(f'{where}: unsupported field {unknown[0]!r}')
  c = {k: given.get(k, default) for k, (default, _) in fields.items()}
  for k, (default, required) in fields.items():
    v = c[k]
    if v is None and default is None and required is None and k != 'context_dim':
      raise ConversionError(f'{where}: missing field {k!r}')
    if v not in (None, False, [], ()) if required == 'absent' else required not in (None, v):
      raise ConversionError(f'{where}: unsupported {k}={v!r} (Stable Diffusion: {default!r})')
  return c


def _per_level(value, n: int, field: str, where: str) -> list[int]:
  values = list(value) if isinstance(value, (list, tuple)) else [value] * n
  if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise ConversionError(f'{where}: {field}={value!r} is not an int or one per level ({n})')
  return values


def _unet_json(c: dict[str, Any], size, where: str) -> dict[str, Any]:
  """diffusers' UNet2DConditionModel config of openaimodel's UNetModel params (as diffusers'
  ``create_unet_diffusers_config_from_ldm``, heads counted per level). ``size``: the latent side,
  LatentDiffusion's ``image_size`` (unet_config's is unused by SD's configs)."""
  ch, mult = int(c['model_channels']), [int(m) for m in c['channel_mult']]
  n, ds = len(mult), {int(d) for d in c['attention_resolutions']}
  attn = [2**i in ds for i in range(n)]
  if c['context_dim'] is None:
    raise ConversionError(f'{where}: missing context_dim (the text tower width)')
  context = _per_level(c['context_dim'], n, 'context_dim', where)
  heads, head_ch = [], int(c['num_head_channels'])
  for m in mult:
    if head_ch != -1:
      if head_ch < 1 or ch * m % head_ch:
        raise ConversionError(f'{where}: num_head_channels={head_ch} does not divide {ch * m}')
      heads.append(ch * m // head_ch)
    elif int(c['num_heads']) < 1:
      raise ConversionError(f'{where}: set num_heads or num_head_channels')
    else:
      heads.append(int(c['num_heads']))
  per_level = lambda field: _per_level(c[field], n, field, where)
  return {
    'sample_size': int(c['image_size'] if size is None else size),
    'in_channels': int(c['in_channels']), 'out_channels': int(c['out_channels']),
    'block_out_channels': [ch * m for m in mult],
    'down_block_types': ['CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in attn],
    'up_block_types': ['CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in attn[::-1]],
    'layers_per_block': per_level('num_res_blocks'), 'attention_head_dim': heads,
    'cross_attention_dim': context[0] if len(set(context)) == 1 else context,
    'transformer_layers_per_block': per_level('transformer_depth'),
    'use_linear_projection': bool(c['use_linear_in_transformer']),
  }  # fmt: skip


def _vae_json(fp: dict[str, Any], scale: float, where: str) -> dict[str, Any]:
  """diffusers' AutoencoderKL config of the KL first stage's params."""
  dd = _fields(fp.get('ddconfig'), DDCONFIG_FIELDS, f'{where}.ddconfig')
  if dd['attn_type'] not in ('vanilla', 'vanilla-xformers', 'none'):
    raise ConversionError(f'{where}.ddconfig: unsupported attn_type={dd["attn_type"]!r}')
  if dd['attn_resolutions']:
    raise ConversionError(
      f'{where}.ddconfig: unsupported attn_resolutions={dd["attn_resolutions"]!r} (only [])'
    )
  if fp.get('embed_dim') != dd['z_channels']:
    raise ConversionError(
      f'{where}: embed_dim={fp.get("embed_dim")!r} must equal ddconfig.z_channels='
      f'{dd["z_channels"]!r} (diffusers AutoencoderKL has one latent width)'
    )
  n = len(dd['ch_mult'])
  return {
    'in_channels': int(dd['in_channels']), 'out_channels': int(dd['out_ch']),
    'block_out_channels': [int(dd['ch']) * int(m) for m in dd['ch_mult']],
    'down_block_types': ['DownEncoderBlock2D'] * n, 'up_block_types': ['UpDecoderBlock2D'] * n,
    'layers_per_block': int(dd['num_res_blocks']), 'latent_channels': int(dd['z_channels']),
    'norm_num_groups': 32,  # ldm's Normalize: GroupNorm(32, eps=1e-6)
    'sample_size': int(dd['resolution']), 'scaling_factor': scale,
    'mid_block_add_attention': dd['attn_type'] != 'none',
  }  # fmt: skip


def from_original_config(path, tokenizer=None) -> Model:
  """The model an original inference YAML describes (see the module docstring)."""
  path = epath.Path(path)
  if not path.exists():
    raise ConversionError(f'{path}: --original_config not found')
  where = str(path)
  try:
    return _from_params(compvis_config.read_config(path), where, tokenizer)
  except ConversionError:
    raise
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise ConversionError(f'{where}: invalid Stable Diffusion config ({e!r})') from e


def _from_params(p: dict[str, Any], where: str, tokenizer) -> Model:
  param = p.get('parameterization', 'eps')
  if param not in PREDICTIONS:
    raise ConversionError(f'{where}: unsupported parameterization={param!r} (eps or v)')
  if p.get('given_betas') is not None:
    raise ConversionError(f'{where}: unsupported given_betas (give linear_start, linear_end)')
  kind = p.get('beta_schedule', 'linear')
  if kind not in compvis_config.SCHEDULES:
    raise ConversionError(f'{where}: unsupported beta_schedule={kind!r}')
  diffusion = {
    'num_timesteps': int(p.get('timesteps', 1000)),
    'beta_schedule': compvis_config.SCHEDULES[kind],
    'beta_start': float(p.get('linear_start', 1e-4)),
    'beta_end': float(p.get('linear_end', 2e-2)),
  }
  if p.get('conditioning_key') not in ('crossattn', 'hybrid'):
    raise ConversionError(
      f'{where}: unsupported conditioning_key={p.get("conditioning_key")!r} (crossattn; hybrid '
      f'for inpainting)'
    )
  cond = p.get('cond_stage_config')
  target = str(cond.get('target', '')) if isinstance(cond, dict) else repr(cond)
  encoder = ENCODERS.get(target.rsplit('.', 1)[-1])
  if encoder is None:
    raise ConversionError(
      f'{where}: unsupported cond_stage_config.target={target!r} (one of {", ".join(ENCODERS)})'
    )
  layer = (cond.get('params') or {}).get('layer', 'last')
  if layer not in (('last', 'penultimate') if encoder == 'open_clip' else ('last',)):
    raise ConversionError(f'{where}: unsupported cond_stage_config.params.layer={layer!r}')
  first = p.get('first_stage_config')
  if not isinstance(first, dict) or 'AutoencoderKL' not in str(first.get('target', '')):
    raise ConversionError(f'{where}: first_stage_config must be an AutoencoderKL')
  scale = float(p.get('scale_factor', 1.0))
  u_where = f'{where}: unet_config.params'
  unet_doc = (p.get('unet_config') or {}).get('params')
  unet_json = _unet_json(_fields(unet_doc, UNET_FIELDS, u_where), p.get('image_size'), u_where)
  try:
    unet = unet_cond.UNetCondConfig.from_diffusers_config(unet_json, u_where)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  f_where = f'{where}: first_stage_config.params'
  vae = kl_config(_vae_json(first.get('params') or {}, scale, f_where), f_where)
  if tokenizer is None:
    raise ConversionError(
      f'{where}: an original config names no tokenizer files; pass --tokenizer=DIR (a tokenizer/ '
      f"folder with vocab.json and merges.txt, e.g. a diffusers pipeline's), or --config=DIR "
      f'instead of --original_config (drc_jax never downloads)'
    )
  inpaint = p.get('conditioning_key') == 'hybrid'
  if inpaint != (unet.in_channels == 2 * vae.latent_channels + 1):
    raise ConversionError(
      f'{where}: conditioning_key={p.get("conditioning_key")!r} with a {unet.in_channels}-channel '
      f'UNet (hybrid: the 9-channel inpainting UNet; crossattn: text-to-image)'
    )
  pipeline = 'StableDiffusionInpaintPipeline' if inpaint else 'StableDiffusionPipeline'
  return Model(
    unet, vae, None, encoder, layer == 'penultimate', diffusion, PREDICTIONS[param], pipeline,
    epath.Path(tokenizer), where,
  )  # fmt: skip


def from_diffusers_config(folder, tokenizer=None) -> Model:
  """The model a diffusers pipeline folder's configs describe (its weights are not read)."""
  folder = diffusers_sd.resolve_src(folder)
  if not folder.is_dir():
    raise ConversionError(f'{folder}: --config is not a folder (a diffusers pipeline folder)')
  pipeline = 'StableDiffusionPipeline'
  if (folder / 'model_index.json').exists():
    pipeline = records.read_json(folder / 'model_index.json', ConversionError).get(
      '_class_name', pipeline
    )
    if pipeline not in diffusers_sd.PIPELINES:
      raise ConversionError(f'{folder / "model_index.json"}: _class_name {pipeline!r} is not SD')
  read = lambda part, name: records.read_json(folder / part / name, ConversionError)
  u_where = str(folder / 'unet' / 'config.json')
  try:
    unet = unet_cond.UNetCondConfig.from_diffusers_config(read('unet', 'config.json'), u_where)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  vae_json = folder / 'vae' / 'config.json'
  vae = kl_config(read('vae', 'config.json'), str(vae_json))
  text_json = folder / 'text_encoder' / 'config.json'
  text = sd_text.text_config(read('text_encoder', 'config.json'), str(text_json))
  sched = folder / 'scheduler' / 'scheduler_config.json'
  found, prediction_type = diffusers_sd.scheduler_settings(sched)
  if vae.shift_factor:
    raise ConversionError(f'{vae_json}: unsupported shift_factor={vae.shift_factor}')
  tok = epath.Path(tokenizer) if tokenizer is not None else folder / 'tokenizer'
  return Model(unet, vae, text, None, None, found, prediction_type, pipeline, tok, str(folder))


_TOP = {
  'time_embedding.linear_1': 'time_embed.0', 'time_embedding.linear_2': 'time_embed.2',
  'conv_in': 'input_blocks.0.0', 'conv_norm_out': 'out.0', 'conv_out': 'out.2',
}  # fmt: skip
_RESNET = {
  'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1',
  'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection',
}  # fmt: skip
_OPEN_CLIP = {
  'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'self_attn.out_proj': 'attn.out_proj',
  'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj',
}  # fmt: skip


def unet_key(key: str, cfg: unet_cond.UNetCondConfig) -> str:
  """The openaimodel key (without ``model.diffusion_model.``) of a diffusers UNet key, as
  ``convert_ldm_unet_checkpoint`` pairs them; transformer names are the same in both."""
  lpb, n = cfg.layers_per_block, len(cfg.layers_per_block)
  down = [1 + sum(lpb[k] + 1 for k in range(i)) for i in range(n)]
  up = [sum(lpb[n - 1 - k] + 1 for k in range(i)) for i in range(n)]
  module, leaf = key.rsplit('.', 1)
  if module in _TOP:
    return f'{_TOP[module]}.{leaf}'
  resnet = lambda rest: '{}.{}'.format(_RESNET[rest.rsplit('.', 1)[0]], rest.rsplit('.', 1)[1])
  if m := re.fullmatch(r'(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)', key):
    i, j = int(m[2]), int(m[4])
    block = f'input_blocks.{down[i] + j}' if m[1] == 'down' else f'output_blocks.{up[i] + j}'
    return f'{block}.0.{resnet(m[5])}' if m[3] == 'resnets' else f'{block}.1.{m[5]}'
  if m := re.fullmatch(r'down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)', key):
    return f'input_blocks.{down[int(m[1])] + lpb[int(m[1])]}.0.op.{m[2]}'
  if m := re.fullmatch(r'up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)', key):
    i = int(m[1])
    cross = unet_cond.UP_BLOCK_TYPES[cfg.up_block_types[i]]
    return f'output_blocks.{up[i] + lpb[n - 1 - i]}.{2 if cross else 1}.conv.{m[2]}'
  if m := re.fullmatch(r'mid_block\.resnets\.(\d)\.(.+)', key):
    return f'middle_block.{2 * int(m[1])}.{resnet(m[2])}'
  if m := re.fullmatch(r'mid_block\.attentions\.0\.(.+)', key):
    return f'middle_block.1.{m[1]}'
  raise AssertionError(f'no openaimodel name for {key}')


def ema_key(key: str) -> str:
  """LitEma's name of the UNet tensor ``model.diffusion_model.<key>`` (dots dropped)."""
  return EMA + ('diffusion_model.' + key).replace('.', '')


def open_clip_key(key: str) -> str:
  """OpenCLIP's text-tower key (without ``cond_stage_model.model.``) of a transformers
  ``CLIPTextModel`` key (``text_model.`` prefixed); q, k, v: parts of ``attn.in_proj_*``."""
  key = key.removeprefix('text_model.')
  if key.startswith('embeddings.'):
    return 'positional_embedding' if 'position' in key else 'token_embedding.weight'
  if key.startswith('final_layer_norm.'):
    return 'ln_final.' + key.rsplit('.', 1)[1]
  m = re.fullmatch(r'encoder\.layers\.(\d+)\.(.+)\.(weight|bias)', key)
  if m is None:
    raise AssertionError(f'no OpenCLIP name for {key}')
  block, module, leaf = f'transformer.resblocks.{m[1]}', m[2], m[3]
  if qkv := re.fullmatch(r'self_attn\.([qkv])_proj', module):
    return f'{block}.attn.in_proj_{leaf}:{qkv[1]}'
  return f'{block}.{_OPEN_CLIP[module]}.{leaf}'


def split_in_proj(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``state`` with each fused ``*.attn.in_proj_weight|bias`` [3D, ...] replaced by its ``:q``,
  ``:k``, ``:v`` parts [D, ...] (nn.MultiheadAttention: q, k, v in that order)."""
  out = {}
  for key, v in state.items():
    if (
      key.endswith(('.attn.in_proj_weight', '.attn.in_proj_bias'))
      and v.ndim
      and not (v.shape[0] % 3)
    ):
      for i, part in enumerate(np.split(v, 3)):
        out[f'{key}:{"qkv"[i]}'] = np.ascontiguousarray(part)
    else:
      out[key] = v
  return out


def _text_config(state, encoder: str, model: Model, where: str) -> tuple[Any, int]:
  """(CLIPTextConfig, the layers the checkpoint holds) of the text tower's weights."""
  p, (tok, pos, fc1, layer) = (
    (CLIP + 'text_model.' * any(k.startswith(CLIP + 'text_model.') for k in state),
     ('embeddings.token_embedding.weight', 'embeddings.position_embedding.weight',
      'encoder.layers.0.mlp.fc1.weight', r'encoder\.layers\.(\d+)\.'))
    if encoder == 'clip' else
    (OPEN_CLIP, ('token_embedding.weight', 'positional_embedding',
                 'transformer.resblocks.0.mlp.c_fc.weight', r'transformer\.resblocks\.(\d+)\.'))
  )  # fmt: skip
  found = {int(m[1]) for k in state if (m := re.match(re.escape(p) + layer, k))}
  held = max(found) + 1 if found else 0
  if model.text is not None:
    return model.text, held
  for key in (tok, pos, fc1):
    if p + key not in state:
      raise ConversionError(f'{where}: missing key {p + key} (the text tower)')
  width = int(state[p + tok].shape[1])
  if width % HEAD_WIDTH:
    raise ConversionError(
      f'{where}: text width {width} is not a multiple of {HEAD_WIDTH} (the heads are not stored; '
      f'give --config=DIR with text_encoder/config.json)'
    )
  try:
    tk = clip_tokenizer.load(model.tokenizer)
  except clip_tokenizer.TokenizerError as e:
    raise ConversionError(str(e)) from e
  cfg = clip_text.CLIPTextConfig(
    vocab_size=int(state[p + tok].shape[0]),
    hidden_size=width,
    intermediate_size=int(state[p + fc1].shape[0]),
    num_hidden_layers=held - 1 if model.penultimate else held,
    num_attention_heads=width // HEAD_WIDTH,
    max_position_embeddings=int(state[p + pos].shape[0]),
    hidden_act='quick_gelu' if encoder == 'clip' else 'gelu',
    bos_token_id=tk.bos_id,
    eos_token_id=tk.eos_id,
    pad_token_id=tk.pad_id,
  )
  return cfg, held


def _text_params(state, model: Model, where: str) -> tuple[clip_text.CLIPTextConfig, Any]:
  has = {
    e: any(k.startswith(p) for k in state) for e, p in (('clip', CLIP), ('open_clip', OPEN_CLIP))
  }
  encoder = model.encoder or ('open_clip' if has['open_clip'] and not has['clip'] else 'clip')
  found = [f'{p}*' for e, p in (('clip', CLIP), ('open_clip', OPEN_CLIP)) if has[e]]
  if found != [f'{CLIP if encoder == "clip" else OPEN_CLIP}*']:
    raise ConversionError(
      f'{where}: expected the text tower under {CLIP if encoder == "clip" else OPEN_CLIP}* alone '
      f'({model.where}); found {" and ".join(found) or "no cond_stage_model.* keys"}'
    )
  cfg, held = _text_config(state, encoder, model, where)
  _, abstract = clip_text.abstract_text_encoder(cfg)
  also: tuple[str, ...] = ()
  if encoder == 'clip':
    p = CLIP + 'text_model.' * any(k.startswith(CLIP + 'text_model.') for k in state)
    sources = {
      n: Source(p + s.key.removeprefix('text_model.'), s.kind)
      for n, s in sd_text.sources(abstract).items()
    }
  else:
    sources = {
      n: Source(OPEN_CLIP + open_clip_key(s.key), s.kind)
      for n, s in sd_text.sources(abstract).items()
    }
    last = cfg.num_hidden_layers
    if held == last + 1 and model.penultimate is not False:  # SD 2.x: the penultimate layer
      first = f'{OPEN_CLIP}transformer.resblocks.0.'
      also = tuple(
        s.key.replace(first, f'{OPEN_CLIP}transformer.resblocks.{last}.')
        for s in sources.values()
        if s.key.startswith(first)
      )
      logging.info('%s: resblock %d not computed (SD 2.x: the penultimate layer)', where, last)
    state = split_in_proj(state)
  what = f'CLIP text tower {cfg} ({model.where})'
  return cfg, assemble_tree(abstract, sources, state, where, what, also)


def _unet_params(net, ema, model: Model, no_ema: bool, where: str) -> tuple[Any, bool]:
  """(UNet params, whether the EMA weights were converted)."""
  _, abstract = unet_cond.abstract_model(model.unet)
  keys = {
    n: (unet_key(s.key, model.unet), s.kind)
    for n, s in sd_unet_sources(model.unet, abstract).items()
  }
  names = {
    'net': {UNET + k for k, _ in keys.values()},
    'ema': {ema_key(k) for k, _ in keys.values()},
  }
  if len(names['ema']) != len(keys):
    raise ConversionError(f"{where}: the UNet's EMA names (without dots) are ambiguous")
  use_ema = bool(ema) and not no_ema
  for copy, tensors in (('net', net), ('ema', ema)):
    if tensors and set(tensors) != names[copy] and copy != ('ema' if use_ema else 'net'):
      odd = sorted(set(tensors) ^ names[copy])
      name = f'EMA copy {EMA}*' if copy == 'ema' else f'raw copy {UNET}*'
      raise ConversionError(
        f"{where}: the UNet's {name} (not converted) does not name the UNet's tensors: "
        f'{describe(odd)}'
      )
  if not (ema if use_ema else net):
    raise ConversionError(
      f'{where}: no {UNET}* weights (the UNet)' + (' and no EMA copy' * (not ema))
    )
  key = ema_key if use_ema else (lambda k: UNET + k)
  sources = {n: Source(key(k), kind) for n, (k, kind) in keys.items()}
  what = f'UNet2DConditionModel {model.unet} ({model.where})'
  return assemble_tree(abstract, sources, ema if use_ema else net, where, what), use_ema


def _vae_params(vae: dict[str, np.ndarray], model: Model, where: str) -> Any:
  _, abstract = kl_lib.abstract_autoencoder_kl(model.vae)
  levels = len(model.vae.block_out_channels)
  sources = {
    n: Source(VAE + compvis_ldm.vq_key(s.key, levels), 'conv1x1' if s.kind == 'linear' else s.kind)
    for n, s in diffusers_ldm.vq_sources(abstract).items()
  }
  return assemble_tree(abstract, sources, vae, where, f'KL autoencoder {model.vae} ({model.where})')


def convert_sd_single_file(
  src,
  *,
  config=None,
  original_config=None,
  tokenizer=None,
  no_ema: bool = False,
  diffusion: dict[str, Any] | None = None,
) -> sd.SDParts:
  """Reads an original-layout Stable Diffusion checkpoint (see the module docstring).

  Args:
    src: the ``.safetensors`` or ``.ckpt`` file.
    config: a diffusers pipeline folder describing the model (or ``original_config``).
    original_config: the original inference YAML (then ``tokenizer`` is required).
    tokenizer: a ``tokenizer/`` folder (default with ``config``: its ``tokenizer/``).
    no_ema: convert ``model.diffusion_model.*`` even when ``model_ema.*`` is present.
    diffusion: explicit schedule settings; each must agree with the configuration.

  Returns:
    The model in memory, for ``diffusers_sd.write``.

  Raises:
    ConversionError: naming the file, field or key refused.
  """
  if (config is None) == (original_config is None):
    raise ConversionError(
      'sd-single-file needs exactly one of --original_config=FILE.yaml (the original inference '
      'config) and --config=DIR (a diffusers pipeline folder)'
    )
  if config is not None:
    model = from_diffusers_config(config, tokenizer)
  else:
    model = from_original_config(original_config, tokenizer)
  if not model.tokenizer.is_dir():
    flag = '--tokenizer' if tokenizer is not None else '--config'
    raise ConversionError(f'{model.tokenizer}: not a tokenizer folder ({flag}: vocab.json...)')
  src = epath.Path(src)
  where = str(src)
  state, step = compvis_ldm.read_state(src)
  groups = {UNET: {}, EMA: {}, VAE: {}, 'cond_stage_model.': {}}
  for k, v in state.items():
    group = next((p for p in groups if k.startswith(p)), None)
    if group is None and k not in IGNORED:
      raise ConversionError(f'{where}: unexpected key {k} (not a Stable Diffusion tensor)')
    if group is not None and k not in IGNORED:
      groups[group][k] = v
  unet_params, used_ema = _unet_params(groups[UNET], groups[EMA], model, no_ema, where)
  vae_params = _vae_params(groups[VAE], model, where)
  text_cfg, text_params = _text_params(groups['cond_stage_model.'], model, where)
  u, latent = model.unet, model.vae.latent_channels
  if u.out_channels != latent or u.in_channels not in (latent, 2 * latent + 1):
    raise ConversionError(
      f'{model.where}: UNet in_channels={u.in_channels}, out_channels={u.out_channels} do not fit '
      f"the VAE's latent channels {latent} (in: {latent}, or {2 * latent + 1} for inpainting)"
    )
  if u.cross_attention_dim != text_cfg.hidden_size or (
    model.vae.in_channels,
    model.vae.out_channels,
  ) != (3, 3):
    raise ConversionError(
      f'{model.where}: UNet cross_attention_dim={u.cross_attention_dim} and text tower width '
      f'{text_cfg.hidden_size} differ, or the VAE is not RGB to RGB'
    )
  settings = diffusion_settings(model.diffusion, diffusion, model.where)
  compvis_ldm._check_betas(state.get('betas'), settings, where, model.where)  # noqa: SLF001
  vae_cfg = model.vae
  if 'scale_factor' in state:  # trained with scale_by_std: the buffer holds the value used
    scale = float(np.asarray(state['scale_factor']).reshape(()))
    vae_cfg = dataclasses.replace(vae_cfg, scaling_factor=scale)
  files = diffusers_sd._tokenizer_files(  # noqa: SLF001
    model.tokenizer, text_cfg.vocab_size, text_cfg.max_position_embeddings
  )
  weights = f'EMA weights {EMA}*' if used_ema else f'raw weights {UNET}*'
  logging.info('%s: UNet from the %s, configuration %s', where, weights, model.where)
  return sd.SDParts(
    unet=(model.unet, unet_params),
    vae=(vae_cfg, vae_params),
    text_encoder=(text_cfg, text_params),
    tokenizer_files=files,
    diffusion=settings,
    prediction_type=model.prediction_type,
    source=f'sd-single-file:{src} ({weights}; config {model.where})',
    pipeline=model.pipeline,
    step=step,
  )
