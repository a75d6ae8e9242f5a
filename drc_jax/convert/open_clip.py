"""``open-clip``: an OpenCLIP checkpoint's image tower (``visual.*``) as a ``clip`` encoder.

  python -m drc_jax.convert --format=open-clip --src=ViT-B-32.bin --activation=quick_gelu \\
      --out=enc/clip_b32
  python -m drc_jax.convert --format=open-clip --src=hub_folder --out=enc/clip_b32

``--src`` is a checkpoint file (``.safetensors``/``.pt``/``.pth``/``.bin``: a state dict of the
whole CLIP model, bare or under ``state_dict`` as OpenCLIP's training saves it), or a hub folder
(``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
Only ``visual.*`` keys are converted; the text tower, ``logit_scale`` etc. are dropped.

The architecture comes from the shapes (width, patch, grid, depth, MLP width, output width).
Two settings are not stored in the weights: the MLP activation (QuickGELU for OpenAI's weights and
``*-quickgelu`` models, exact GELU for the others) and the head count (width / 64 in every OpenCLIP
ViT). A hub folder's ``open_clip_config.json`` gives both (``quick_gelu``, ``head_width``) and the
preprocessing; for a bare file ``--activation`` is required and ``--heads`` optional. Vision
settings our tower does not compute are refused by name (layer scale, attentional pooling, no
ln_pre, average pooling, custom attention blocks, timm or ResNet towers, norm/act kwargs).

OpenAI's original ``ViT-B-32.pt`` is a TorchScript archive, which ``torch.load(weights_only=True)``
refuses: save its ``state_dict()`` (``torch.jit.load(f).state_dict()``, same ``visual.*`` keys)
to a ``.safetensors`` or ``.pt`` file first.
"""

from __future__ import annotations

from etils import epath

from drc_jax.convert import encoder_params as ep
from drc_jax.convert.common import ConversionError, describe
from drc_jax.core import records
from drc_jax.models import clip, vit
from drc_jax.targets import encoders

FAMILY = 'clip'
_CONFIG = 'open_clip_config.json'
_WEIGHT_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')
_BLOCK = {'norm1': 'ln_1', 'attn.proj': 'attn.out_proj', 'norm2': 'ln_2'}
_BLOCK |= {'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj'}
# vision_cfg field -> the value our tower computes (absent fields take OpenCLIP's defaults).
_VISION_DEFAULTS = {
  'ls_init_value': None,
  'attentional_pool': False,
  'no_ln_pre': False,
  'pool_type': 'tok',
  'act_kwargs': None,
  'norm_kwargs': None,
  'block_type': None,
  'qk_norm': False,
  'scaled_cosine_attn': False,
  'scale_heads': False,
  'scale_attn_inner': False,
  'scale_attn': False,
  'scale_fc': False,
  'timm_model_name': None,
}
_UNSUPPORTED = {
  'visual.trunk.': 'a timm image tower (timm_model_name)',
  'visual.attn_pool': 'attentional pooling (attentional_pool)',
  '.ls_1.': 'layer scale (ls_init_value)',
  '.ls_2.': 'layer scale (ls_init_value)',
  '.ln_attn.': 'custom attention blocks (scale_attn)',
  '.attn.ln_inner.': 'custom attention blocks (scale_attn_inner)',
  '.mlp.ln.': 'custom attention blocks (scale_fc)',
}


def _read_config(folder) -> dict:
  path = folder / _CONFIG
  doc = records.read_json(path, ConversionError)
  if not isinstance(doc.get('model_cfg'), dict):
    raise ConversionError(f'{path}: no model_cfg object')
  vision = doc['model_cfg'].get('vision_cfg', {})
  for field, ours in _VISION_DEFAULTS.items():
    if field == 'block_type' and vision.get(field) == 'default':
      continue
    if vision.get(field, ours) != ours:
      raise ConversionError(
        f'{path}: model_cfg.vision_cfg.{field}={vision[field]!r} is not supported by the clip '
        f'encoder (it computes {field}={ours!r})'
      )
  return doc


def _refuse_unsupported(state, where: str) -> None:
  for frag, what in _UNSUPPORTED.items():
    keys = [k for k in state if k.startswith('visual.') and frag in k]
    if keys:
      raise ConversionError(
        f'{where}: {what} is not supported by the clip encoder (found {describe(keys, 3)})'
      )
  if 'visual.class_embedding' not in state:
    visual = [k for k in state if k.startswith('visual.')]
    raise ConversionError(
      f'{where}: no visual.class_embedding: not an OpenCLIP ViT image tower (ResNet and timm '
      f'towers are not supported; visual keys: {describe(visual, 4) or "none"})'
    )
  if 'visual.ln_pre.weight' not in state:
    raise ConversionError(f'{where}: no visual.ln_pre.weight: towers without ln_pre unsupported')


def config_from_state(
  state, where: str, activation: str, heads: int | None = None, head_width: int = 64
) -> clip.CLIPConfig:
  """The image tower of an OpenCLIP state dict, read from its ``visual.*`` shapes."""
  _refuse_unsupported(state, where)
  width = ep.require(state, 'visual.class_embedding', 1, where).shape[0]
  conv = ep.require(state, 'visual.conv1.weight', 4, where)
  if conv.shape[2] != conv.shape[3]:
    raise ConversionError(f'{where}: visual.conv1.weight {conv.shape}: non-square patches')
  pos = ep.require(state, 'visual.positional_embedding', 2, where)
  grid = ep.square_grid(pos.shape[0], 'visual.positional_embedding', where)
  proj = ep.require(state, 'visual.proj', 2, where)
  fc = ep.require(state, 'visual.transformer.resblocks.0.mlp.c_fc.weight', 2, where)
  return ep.checked_config(
    clip.CLIPConfig,
    where,
    image_size=grid * conv.shape[2],
    patch_size=conv.shape[2],
    width=width,
    layers=ep.block_count(state, 'visual.transformer.resblocks', where),
    heads=ep.heads_for(width, heads, 'visual.class_embedding', where, head_width),
    mlp_dim=fc.shape[0],
    output_dim=proj.shape[1],
    activation=activation,
    channels=conv.shape[1],
  )


def plan(cfg: clip.CLIPConfig) -> dict[str, ep.Take]:
  out = {
    'conv1.kernel': ep.Take.one('visual.conv1.weight', 'conv'),
    'class_embedding': ep.Take.one('visual.class_embedding', 'vector'),
    'positional_embedding': ep.Take.one('visual.positional_embedding', 'vector'),
    'ln_pre.scale': ep.Take.one('visual.ln_pre.weight', 'vector'),
    'ln_pre.bias': ep.Take.one('visual.ln_pre.bias', 'vector'),
    'ln_post.scale': ep.Take.one('visual.ln_post.weight', 'vector'),
    'ln_post.bias': ep.Take.one('visual.ln_post.bias', 'vector'),
    'proj': ep.Take.one('visual.proj', 'vector'),
  }
  for i in range(cfg.layers):
    theirs = f'visual.transformer.resblocks.{i}'
    out |= ep.block_plan(f'blocks.{i}', theirs, _BLOCK)
    out[f'blocks.{i}.attn.qkv.kernel'] = ep.Take.one(f'{theirs}.attn.in_proj_weight', 'linear')
    out[f'blocks.{i}.attn.qkv.bias'] = ep.Take.one(f'{theirs}.attn.in_proj_bias', 'vector')
  return out


def _settings(folder, activation: str | None, where: str) -> tuple[str, int, dict | None]:
  """(activation, head width, config document) from the hub folder's config or the flags."""
  doc = _read_config(folder) if folder is not None and (folder / _CONFIG).exists() else None
  if doc is not None:
    model_cfg = doc['model_cfg']
    found = 'quick_gelu' if model_cfg.get('quick_gelu', False) else 'gelu'
    if activation is not None and activation != found:
      raise ConversionError(
        f'--activation={activation} contradicts {folder / _CONFIG} (quick_gelu='
        f'{model_cfg.get("quick_gelu", False)})'
      )
    return found, int(model_cfg.get('vision_cfg', {}).get('head_width', 64)), doc
  if activation is None:
    raise ConversionError(
      f'{where}: the MLP activation is not stored in the weights: give --activation=quick_gelu '
      "(OpenAI's weights, *-quickgelu models) or --activation=gelu (other OpenCLIP models), or "
      f'convert the hub folder holding {_CONFIG}'
    )
  if activation not in vit.ACTIVATIONS:
    raise ConversionError(f'--activation={activation!r}: expected one of {vit.ACTIVATIONS}')
  return activation, 64, None


def _preprocess(cfg: clip.CLIPConfig, doc: dict | None, where: str) -> encoders.Preprocess:
  pre = clip.default_preprocess(cfg)
  p = (doc or {}).get('preprocess_cfg') or {}
  resize = p.get('interpolation', pre.resize)
  if resize not in ('bicubic', 'bilinear'):
    raise ConversionError(f'{where}: preprocess_cfg.interpolation={resize!r} is not supported')
  mean, std = tuple(p.get('mean', pre.mean)), tuple(p.get('std', pre.std))
  if len(mean) != 3 or len(std) != 3:
    raise ConversionError(f'{where}: preprocess_cfg mean/std need 3 values, got {mean}, {std}')
  return encoders.Preprocess(pre.size, mean, std, resize)


def read(src, heads: int | None = None, activation: str | None = None):
  """Reads an OpenCLIP image tower: (family, config, params, Preprocess, source)."""
  path = ep.find_weights(src, _WEIGHT_FILES, 'open-clip')
  where = str(path)
  folder = epath.Path(src) if epath.Path(src).is_dir() else None
  activation, head_width, doc = _settings(folder, activation, where)
  state = ep.read_state(path, ('state_dict',))
  cfg = config_from_state(state, where, activation, heads, head_width)
  size = (doc or {}).get('model_cfg', {}).get('vision_cfg', {}).get('image_size')
  if size is not None and size not in (cfg.image_size, [cfg.image_size] * 2):
    raise ConversionError(
      f'{folder / _CONFIG}: vision_cfg.image_size={size} differs from the {cfg.image_size} of '
      f'the weights (visual.positional_embedding grid x patch)'
    )
  others = [k for k in state if not k.startswith('visual.')]
  params = ep.assemble(FAMILY, cfg, plan(cfg), state, where, dropped=others)
  return FAMILY, cfg, params, _preprocess(cfg, doc, where), f'open-clip:{path}'
