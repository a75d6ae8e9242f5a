"""``timm-vit``: a timm VisionTransformer state dict, or DINO's official backbone weights, as a
``vit`` encoder.

  python -m drc_jax.convert --format=timm-vit --src=dino_deitsmall16_pretrain.pth --out=enc/dino_s16

Reads a ``.safetensors``/``.pth``/``.bin`` file (or a timm hub folder holding
``model.safetensors`` or ``pytorch_model.bin``): a bare state dict, or one under ``model`` /
``state_dict`` (DeiT-style checkpoints); a ``backbone.`` prefix (DINO's training wrappers) is
dropped. DINO's ``dino_deit{small,base}{16,8}_pretrain.pth`` are timm's layout without ``head``.

The architecture comes from the shapes: width from ``cls_token``, depth from the ``blocks.N``
count, patch size from the patch-embedding kernel, the trained grid from ``pos_embed``, the MLP
width from ``fc1``. Not stored, and taken as timm's defaults: LayerNorm eps 1e-6, CLS-token
pooling, and head width 64 (heads = width / 64; ``--heads`` overrides). Settings our ViT does not
compute are refused by name (layer scale, register or distillation tokens, no CLS token, qk-norm,
pre-norm, fc-norm, attention pooling, patch-embedding norm, position embeddings without a CLS
entry). A classifier ``head`` is dropped.

Preprocessing recorded: the trained size (224 for DINO), ImageNet mean/std, bicubic.
"""

from __future__ import annotations

from drc_jax.convert import encoder_params as ep
from drc_jax.convert.common import ConversionError, describe
from drc_jax.models import vit

FAMILY = 'vit'
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.pth')
# Key fragment -> the timm setting it reveals (none of which our ViT computes).
_UNSUPPORTED = {
  'reg_token': 'register tokens (reg_tokens > 0)',
  'dist_token': 'a distillation token (DeiT distilled models)',
  '.ls1.': 'layer scale (init_values)',
  '.ls2.': 'layer scale (init_values)',
  '.q_norm.': 'qk-norm (qk_norm=True)',
  '.k_norm.': 'qk-norm (qk_norm=True)',
  'norm_pre.': 'a pre-norm before the blocks (pre_norm=True)',
  'fc_norm.': "an fc-norm after pooling (global_pool='avg' models)",
  'attn_pool.': "attention pooling (global_pool='map')",
  'patch_embed.norm.': 'a norm in the patch embedding',
  '.attn.norm.': 'a norm inside attention (scale_attn_norm=True)',
  '.mlp.norm.': 'a norm inside the MLP (scale_mlp_norm=True)',
}
_BLOCK = {'norm1': 'norm1', 'attn.proj': 'attn.proj', 'norm2': 'norm2'}
_BLOCK |= {'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}


def _refuse_unsupported(state, where: str) -> None:
  if 'cls_token' not in state:
    raise ConversionError(
      f'{where}: no cls_token: models without a CLS token (class_token=False) are not supported'
    )
  for frag, what in _UNSUPPORTED.items():
    keys = [k for k in state if frag in k or k.startswith(frag)]
    if keys:
      raise ConversionError(
        f'{where}: {what} is not supported by the vit encoder (found {describe(keys, 3)})'
      )
  block = [k for k in state if k.startswith('blocks.0.attn.')]
  if 'blocks.0.attn.qkv.weight' in state and 'blocks.0.attn.qkv.bias' not in state:
    raise ConversionError(
      f'{where}: no blocks.0.attn.qkv.bias: qkv_bias=False is not supported by the vit encoder'
    )
  if block and 'blocks.0.attn.qkv.weight' not in state:
    raise ConversionError(
      f'{where}: no fused blocks.0.attn.qkv.weight (found {describe(block, 4)}): not timm layout'
    )


def config_from_state(state, where: str, heads: int | None = None) -> vit.ViTConfig:
  """The ViT a timm / DINO state dict holds, read from its shapes; unsupported settings refused."""
  _refuse_unsupported(state, where)
  cls = ep.require(state, 'cls_token', 3, where)
  dim = cls.shape[-1]
  patch = ep.require(state, 'patch_embed.proj.weight', 4, where)
  if patch.shape[2] != patch.shape[3]:
    raise ConversionError(f'{where}: patch_embed.proj.weight {patch.shape}: non-square patches')
  pos = ep.require(state, 'pos_embed', 3, where)
  grid = ep.square_grid(pos.shape[1], 'pos_embed', where)
  fc1 = ep.require(state, 'blocks.0.mlp.fc1.weight', 2, where)
  return ep.checked_config(
    vit.ViTConfig,
    where,
    image_size=grid * patch.shape[2],
    patch_size=patch.shape[2],
    embed_dim=dim,
    depth=ep.block_count(state, 'blocks', where),
    num_heads=ep.heads_for(dim, heads, 'cls_token', where),
    mlp_dim=fc1.shape[0],
    channels=patch.shape[1],
  )


def plan(cfg: vit.ViTConfig) -> dict[str, ep.Take]:
  out = {
    'patch_embed.kernel': ep.Take.one('patch_embed.proj.weight', 'conv'),
    'patch_embed.bias': ep.Take.one('patch_embed.proj.bias', 'vector'),
    'cls_token': ep.Take.one('cls_token', 'vector'),
    'pos_embed': ep.Take.one('pos_embed', 'vector'),
    'norm.scale': ep.Take.one('norm.weight', 'vector'),
    'norm.bias': ep.Take.one('norm.bias', 'vector'),
  }
  for i in range(cfg.depth):
    out |= ep.block_plan(f'blocks.{i}', f'blocks.{i}', _BLOCK)
    out[f'blocks.{i}.attn.qkv.kernel'] = ep.Take.one(f'blocks.{i}.attn.qkv.weight', 'linear')
    out[f'blocks.{i}.attn.qkv.bias'] = ep.Take.one(f'blocks.{i}.attn.qkv.bias', 'vector')
  return out


def read(src, heads: int | None = None):
  """Reads timm / DINO ViT weights: (family, config, params, Preprocess, source)."""
  path = ep.find_weights(src, _WEIGHT_FILES, 'timm-vit')
  where = str(path)
  state = ep.read_state(path, ('model', 'state_dict'))
  if all(k.startswith('backbone.') for k in state):
    state = {k[len('backbone.') :]: v for k, v in state.items()}
  cfg = config_from_state(state, where, heads)
  head = [k for k in state if k.startswith('head.')]
  params = ep.assemble(FAMILY, cfg, plan(cfg), state, where, dropped=head)
  pre = vit.default_preprocess(cfg)
  return FAMILY, cfg, params, pre, f'timm-vit:{path}'
