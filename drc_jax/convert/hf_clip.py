"""``hf-clip``: a Hugging Face CLIP image tower as a ``clip`` encoder (``image_embeds``).

  python -m drc_jax.convert --format=hf-clip --src=clip-vit-base-patch32 --out=enc/clip_b32

``--src`` is a model folder: ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
of a ``CLIPVisionModelWithProjection`` (model_type ``clip_vision_model``) or of a full
``CLIPModel`` (``clip``: the vision tower and ``visual_projection`` are converted, the text tower
and ``text_projection``/``logit_scale`` dropped). The architecture comes from ``config.json``
(absent fields take ``CLIPVisionConfig``'s defaults) and every tensor is checked against it.
``hidden_act`` must be ``quick_gelu`` or ``gelu`` (exact); others are refused by name. The separate
q/k/v projections become one fused qkv (three tensors, concatenated).

Preprocessing: ``preprocessor_config.json``'s ``image_mean``/``image_std`` when present, else
CLIP's; the config's image size; bicubic.
"""

from __future__ import annotations

from etils import epath

from drc_jax.convert import encoder_params as ep
from drc_jax.convert.common import ConversionError
from drc_jax.core import records
from drc_jax.models import clip
from drc_jax.targets import encoders

FAMILY = 'clip'
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
_VISION_DEFAULTS = {  # CLIPVisionConfig's defaults (save_pretrained may omit default fields)
  'hidden_size': 768,
  'intermediate_size': 3072,
  'projection_dim': 512,
  'num_hidden_layers': 12,
  'num_attention_heads': 12,
  'num_channels': 3,
  'image_size': 224,
  'patch_size': 32,
  'hidden_act': 'quick_gelu',
  'layer_norm_eps': 1e-5,
}
_BLOCK = {'norm1': 'layer_norm1', 'attn.proj': 'self_attn.out_proj', 'norm2': 'layer_norm2'}
_BLOCK |= {'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
_VM = 'vision_model'
_BUFFERS = ('vision_model.embeddings.position_ids', 'text_model.embeddings.position_ids')


def config_from_json(doc: dict, where: str) -> clip.CLIPConfig:
  """The vision tower of a CLIPVisionConfig / CLIPConfig document."""
  kind = doc.get('model_type')
  if kind == 'clip':
    vision = dict(_VISION_DEFAULTS, **doc.get('vision_config', {}))
    vision['projection_dim'] = doc.get('projection_dim', _VISION_DEFAULTS['projection_dim'])
  elif kind == 'clip_vision_model':
    vision = dict(_VISION_DEFAULTS, **doc)
  else:
    raise ConversionError(
      f"{where}: model_type {kind!r} is not a CLIP model ('clip' or 'clip_vision_model')"
    )
  act = vision['hidden_act']
  if act not in ('quick_gelu', 'gelu'):
    raise ConversionError(
      f"{where}: hidden_act={act!r} is not supported by the clip encoder ('quick_gelu', 'gelu')"
    )
  return ep.checked_config(
    clip.CLIPConfig,
    where,
    image_size=int(vision['image_size']),
    patch_size=int(vision['patch_size']),
    width=int(vision['hidden_size']),
    layers=int(vision['num_hidden_layers']),
    heads=int(vision['num_attention_heads']),
    mlp_dim=int(vision['intermediate_size']),
    output_dim=int(vision['projection_dim']),
    activation=act,
    norm_eps=float(vision['layer_norm_eps']),
    channels=int(vision['num_channels']),
  )


def plan(cfg: clip.CLIPConfig) -> dict[str, ep.Take]:
  emb = f'{_VM}.embeddings'
  out = {
    'conv1.kernel': ep.Take.one(f'{emb}.patch_embedding.weight', 'conv'),
    'class_embedding': ep.Take.one(f'{emb}.class_embedding', 'vector'),
    'positional_embedding': ep.Take.one(f'{emb}.position_embedding.weight', 'vector'),
    'ln_pre.scale': ep.Take.one(f'{_VM}.pre_layrnorm.weight', 'vector'),
    'ln_pre.bias': ep.Take.one(f'{_VM}.pre_layrnorm.bias', 'vector'),
    'ln_post.scale': ep.Take.one(f'{_VM}.post_layernorm.weight', 'vector'),
    'ln_post.bias': ep.Take.one(f'{_VM}.post_layernorm.bias', 'vector'),
    'proj': ep.Take.one('visual_projection.weight', 'linear'),
  }
  for i in range(cfg.layers):
    theirs = f'{_VM}.encoder.layers.{i}'
    out |= ep.block_plan(f'blocks.{i}', theirs, _BLOCK)
    qkv = tuple(f'{theirs}.self_attn.{n}_proj' for n in 'qkv')
    out[f'blocks.{i}.attn.qkv.kernel'] = ep.Take(tuple(f'{k}.weight' for k in qkv), 'linear')
    out[f'blocks.{i}.attn.qkv.bias'] = ep.Take(tuple(f'{k}.bias' for k in qkv), 'vector')
  return out


def _preprocess(cfg: clip.CLIPConfig, folder) -> encoders.Preprocess:
  pre = clip.default_preprocess(cfg)
  path = folder / 'preprocessor_config.json'
  if not path.exists():
    return pre
  doc = records.read_json(path, ConversionError)
  mean, std = tuple(doc.get('image_mean', pre.mean)), tuple(doc.get('image_std', pre.std))
  if len(mean) != 3 or len(std) != 3:
    raise ConversionError(f'{path}: image_mean/image_std need 3 values, got {mean}, {std}')
  return encoders.Preprocess(pre.size, mean, std, pre.resize)


def read(src):
  """Reads a HF CLIP vision tower with projection: (family, config, params, Preprocess, source)."""
  folder = epath.Path(src)
  if not folder.is_dir():
    raise ConversionError(
      f'{folder}: --format=hf-clip needs a model folder (config.json + weights)'
    )
  config_path = folder / 'config.json'
  if not config_path.exists():
    raise ConversionError(f'{config_path}: not found')
  cfg = config_from_json(records.read_json(config_path, ConversionError), str(config_path))
  path = ep.find_weights(folder, _WEIGHT_FILES, 'hf-clip')
  state = ep.read_state(path)
  if 'visual_projection.weight' not in state and f'{_VM}.post_layernorm.weight' in state:
    raise ConversionError(
      f'{path}: no visual_projection.weight: a CLIPVisionModel without projection is not '
      'supported (image_embeds need CLIPVisionModelWithProjection or CLIPModel weights)'
    )
  dropped = [
    k
    for k in state
    if k.startswith(('text_model.', 'text_projection.')) or k in ('logit_scale', *_BUFFERS)
  ]
  params = ep.assemble(FAMILY, cfg, plan(cfg), state, str(path), dropped=dropped)
  return FAMILY, cfg, params, _preprocess(cfg, folder), f'hf-clip:{folder}'
