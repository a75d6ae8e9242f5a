"""ViT (timm / DINO) and CLIP (OpenCLIP, Hugging Face) encoders compute what PyTorch computes.

Each case builds the PyTorch model with seeded random weights (LayerNorms, biases and tokens
perturbed away from their 1/0 initial values, so a swapped or dropped tensor shows), saves its
state dict as the public files are laid out, converts it with ``drc_jax.convert`` and compares
``load_encoder(DIR).embed`` (NHWC) with the PyTorch output (NCHW) on the same input.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='encoder exactness tests need the torch extra')
timm = pytest.importorskip('timm')
open_clip = pytest.importorskip('open_clip')
transformers = pytest.importorskip('transformers')

from safetensors.torch import save_file  # noqa: E402  pylint: disable=g-import-not-at-top

from drc_jax import convert, load_encoder  # noqa: E402
from drc_jax.drc import saliency  # noqa: E402
from drc_jax.models import clip as clip_lib  # noqa: E402
from drc_jax.models import vit as vit_lib  # noqa: E402
from drc_jax.targets import encoders  # noqa: E402

ATOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _perturb(model, seed):
  """Moves every 1-D parameter (LayerNorm scales and biases, biases) and token off its init."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or 'token' in name or 'embed' in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _input(seed, batch, h, w=None):
  gen = torch.Generator().manual_seed(seed)
  return torch.randn(batch, 3, h, w or h, generator=gen)


def _nhwc(x):
  return x.permute(0, 2, 3, 1).numpy()


def _max_diff(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def _save_state(model, path, drop=()):
  state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(drop)}
  if str(path).endswith('.safetensors'):
    save_file(state, str(path))
  else:
    torch.save(state, str(path))
  return path


# --------------------------------------------------------------------------- timm / DINO ViT


def _timm(name='vit_small_patch16_224', seed=0, **kw):
  torch.manual_seed(seed)
  return _perturb(timm.create_model(name, pretrained=False, num_classes=0, **kw), seed + 1)


_TINY = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=3.0)


def _timm_cls_attention(model, x):
  """The last block's CLS attention over the patches, recomputed from its qkv projection."""
  out = {}
  attn = model.blocks[-1].attn
  hook = attn.qkv.register_forward_hook(lambda m, i, o: out.setdefault('qkv', o))
  with torch.no_grad():
    model(x)
  hook.remove()
  b, n, _ = out['qkv'].shape
  qkv = out['qkv'].reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
  q, k = qkv[0], qkv[1]
  weights = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)
  return weights[:, :, 0, 1:]


def test_timm_tiny_via_cli_matches_with_attention_and_resampled_grids(tmp_path):
  model = _timm(**_TINY)
  src = _save_state(model, tmp_path / 'tiny.safetensors')
  out = tmp_path / 'enc'
  subprocess.run(
    [sys.executable, '-m', 'drc_jax.convert', '--format=timm-vit', f'--src={src}', f'--out={out}'],
    check=True,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  enc = load_encoder(out)
  assert enc.family == 'vit'
  assert enc.config == vit_lib.ViTConfig(32, 8, 128, 2, 2, 384)
  assert enc.preprocess == vit_lib.default_preprocess(enc.config)
  x = _input(0, 2, 32)
  with torch.no_grad():
    want = model(x)
  assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL
  attn = enc.cls_attention(_nhwc(x))
  assert attn.shape == (2, 2, 16)
  assert _max_diff(attn, _timm_cls_attention(model, x)) <= 1e-6
  # Other input grids: timm resamples pos_embed (bicubic, antialiased) with dynamic_img_size.
  dynamic = _timm(dynamic_img_size=True, **_TINY)
  dynamic.load_state_dict(model.state_dict())
  for h, w in ((16, 24), (48, 48), (24, 24)):
    x = _input(1, 2, h, w)
    with torch.no_grad():
      want = dynamic(x)
    assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL, (h, w)


def test_timm_head_is_dropped_and_heads_option(tmp_path):
  """A classifier head is dropped (embed = the pre-logits feature); --heads sets 4 heads of 32."""
  torch.manual_seed(3)
  kw = dict(_TINY, num_heads=4)
  model = _perturb(timm.create_model('vit_small_patch16_224', num_classes=5, **kw), 4)
  src = _save_state(model, tmp_path / 'with_head.pth')
  enc = convert.convert_encoder('timm-vit', src, tmp_path / 'enc', heads=4)
  assert enc.config.num_heads == 4
  x = _input(2, 2, 32)
  with torch.no_grad():
    want = model.forward_head(model.forward_features(x), pre_logits=True)
  assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL
  assert _max_diff(enc.cls_attention(_nhwc(x)), _timm_cls_attention(model, x)) <= 1e-6


def test_dino_vit_s16_paper_size(tmp_path):
  """DINO's ViT-S/16 (dino_deitsmall16_pretrain.pth: timm's keys, no head) at 224 and at 112."""
  model = _timm('vit_small_patch16_224', seed=5)
  src = _save_state(model, tmp_path / 'dino_deitsmall16_pretrain.pth')
  enc = convert.convert_encoder('timm-vit', src, tmp_path / 'enc')
  assert enc.config == vit_lib.CONFIGS['vit_s16']
  x = _input(3, 1, 224)
  with torch.no_grad():
    want = model(x)
  assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL
  assert _max_diff(enc.cls_attention(_nhwc(x)), _timm_cls_attention(model, x)) <= 1e-6
  dynamic = _timm('vit_small_patch16_224', dynamic_img_size=True)
  dynamic.load_state_dict(model.state_dict())
  x = _input(4, 1, 112)
  with torch.no_grad():
    want = dynamic(x)
  assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL


@pytest.mark.parametrize(
  'kw, named',
  [
    (dict(init_values=1e-5), 'layer scale'),
    (dict(reg_tokens=2), 'register tokens'),
    (dict(qk_norm=True), 'qk-norm'),
    (dict(class_token=False, global_pool='avg', fc_norm=False), 'no cls_token'),
    (dict(qkv_bias=False), 'qkv_bias=False'),
  ],
)
def test_timm_unsupported_settings_are_named(tmp_path, kw, named):
  src = _save_state(_timm(**dict(_TINY, **kw)), tmp_path / 'w.safetensors')
  with pytest.raises(convert.ConversionError, match=named):
    convert.convert_encoder('timm-vit', src, tmp_path / 'enc')


def test_timm_missing_and_misshapen_keys_are_named(tmp_path):
  state = _timm(**_TINY).state_dict()
  missing = {k: v for k, v in state.items() if k != 'blocks.1.norm1.weight'}
  save_file(missing, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(convert.ConversionError, match=r'missing keys blocks\.1\.norm1\.weight'):
    convert.convert_encoder('timm-vit', tmp_path / 'missing.safetensors', tmp_path / 'a')
  bad = dict(state, **{'blocks.0.mlp.fc2.bias': torch.zeros(7)})
  save_file(bad, str(tmp_path / 'bad.safetensors'))
  with pytest.raises(
    convert.ConversionError, match=r'blocks\.0\.mlp\.fc2\.bias: checkpoint \(7,\)'
  ):
    convert.convert_encoder('timm-vit', tmp_path / 'bad.safetensors', tmp_path / 'b')
  extra = dict(state, **{'blocks.0.attn.mystery': torch.zeros(3)})
  save_file(extra, str(tmp_path / 'extra.safetensors'))
  with pytest.raises(convert.ConversionError, match=r'unexpected keys blocks\.0\.attn\.mystery'):
    convert.convert_encoder('timm-vit', tmp_path / 'extra.safetensors', tmp_path / 'c')
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


# --------------------------------------------------------------------------- OpenCLIP


def _open_clip_tiny(quick_gelu, seed=0):
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(
    embed_dim=48,
    vision_cfg=dict(image_size=32, layers=2, width=128, head_width=32, patch_size=8, mlp_ratio=3),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    quick_gelu=quick_gelu,
  )
  return _perturb(model, seed + 1)


def _encode(model, x):
  with torch.no_grad():
    return model.encode_image(x)


def test_open_clip_tiny_file_and_hub_folder(tmp_path):
  """A bare file (activation and heads given) and a hub folder (read from its config)."""
  for quick_gelu in (False, True):
    model = _open_clip_tiny(quick_gelu, seed=int(quick_gelu))
    act = 'quick_gelu' if quick_gelu else 'gelu'
    x = _input(5, 2, 32)
    file = _save_state(model, tmp_path / f'{act}.pt')
    enc = convert.convert_encoder(
      'open-clip', file, tmp_path / f'{act}_enc', heads=4, activation=act
    )
    assert enc.config == clip_lib.CLIPConfig(32, 8, 128, 2, 4, 384, 48, act)
    assert _max_diff(enc.embed(_nhwc(x)), _encode(model, x)) <= ATOL
  hub = tmp_path / 'hub'
  hub.mkdir()
  _save_state(model, hub / 'open_clip_model.safetensors')
  model_cfg = dict(embed_dim=48, quick_gelu=True, vision_cfg=dict(head_width=32))
  pre = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
  (hub / 'open_clip_config.json').write_text(
    json.dumps(dict(model_cfg=model_cfg, preprocess_cfg=pre))
  )
  enc = convert.convert_encoder('open-clip', hub, tmp_path / 'hub_enc')
  assert (enc.config.heads, enc.config.activation) == (4, 'quick_gelu')
  assert enc.preprocess.mean == (0.5, 0.5, 0.5) and enc.preprocess.std == (0.25, 0.25, 0.25)
  assert _max_diff(enc.embed(_nhwc(x)), _encode(model, x)) <= ATOL


def test_open_clip_vit_b32_quickgelu_paper_size(tmp_path):
  """OpenAI's ViT-B/32 architecture (QuickGELU), the paper's CLIP; only visual.* saved."""
  torch.manual_seed(7)
  model = _perturb(open_clip.create_model('ViT-B-32-quickgelu', pretrained=None), 8)
  src = _save_state(model, tmp_path / 'b32.safetensors', drop=('transformer.', 'token_embedding'))
  enc = convert.convert_encoder('open-clip', src, tmp_path / 'enc', activation='quick_gelu')
  assert enc.config == clip_lib.CONFIGS['vit_b32']
  x = _input(6, 1, 224)
  assert _max_diff(enc.embed(_nhwc(x)), _encode(model, x)) <= ATOL


def test_open_clip_errors_name_the_setting(tmp_path):
  model = _open_clip_tiny(False)
  src = _save_state(model, tmp_path / 'w.pt')
  with pytest.raises(convert.ConversionError, match='--activation'):
    convert.convert_encoder('open-clip', src, tmp_path / 'a')
  state = {k: v for k, v in model.state_dict().items() if k != 'visual.ln_post.bias'}
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'm.safetensors'))
  with pytest.raises(convert.ConversionError, match=r'missing keys visual\.ln_post\.bias'):
    convert.convert_encoder(
      'open-clip', tmp_path / 'm.safetensors', tmp_path / 'b', activation='gelu'
    )
  hub = tmp_path / 'hub'
  hub.mkdir()
  _save_state(model, hub / 'open_clip_pytorch_model.bin')
  cfg = dict(model_cfg=dict(vision_cfg=dict(head_width=32, pool_type='avg')))
  (hub / 'open_clip_config.json').write_text(json.dumps(cfg))
  with pytest.raises(convert.ConversionError, match='pool_type'):
    convert.convert_encoder('open-clip', hub, tmp_path / 'c')
  with pytest.raises(convert.ConversionError, match='does not take --activation'):
    convert.convert_encoder('timm-vit', src, tmp_path / 'd', activation='gelu')


# --------------------------------------------------------------------------- Hugging Face CLIP


def _hf_vision_config(**kw):
  base = dict(
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=3,
    image_size=32,
    patch_size=8,
    projection_dim=40,
  )
  return transformers.CLIPVisionConfig(**dict(base, **kw))


def test_hf_clip_vision_with_projection_and_full_clip_model(tmp_path):
  torch.manual_seed(9)
  vision = _hf_vision_config(hidden_act='gelu', layer_norm_eps=1e-6)
  model = _perturb(transformers.CLIPVisionModelWithProjection(vision), 10)
  model.save_pretrained(tmp_path / 'vision')
  enc = convert.convert_encoder('hf-clip', tmp_path / 'vision', tmp_path / 'vision_enc')
  assert enc.config == clip_lib.CLIPConfig(32, 8, 96, 2, 3, 160, 40, 'gelu', 1e-6)
  x = _input(7, 2, 32)
  with torch.no_grad():
    want = model(pixel_values=x).image_embeds
  assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL

  torch.manual_seed(11)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  full_cfg = transformers.CLIPConfig(
    vision_config=_hf_vision_config().to_dict(), text_config=text, projection_dim=24
  )
  full = _perturb(transformers.CLIPModel(full_cfg), 12)
  full.save_pretrained(tmp_path / 'full')
  enc = convert.convert_encoder('hf-clip', tmp_path / 'full', tmp_path / 'full_enc')
  assert (enc.config.output_dim, enc.config.activation) == (24, 'quick_gelu')
  with torch.no_grad():
    want = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)  # image_embeds
  assert _max_diff(enc.embed(_nhwc(x)), want) <= ATOL


def test_hf_clip_unsupported_activation_and_misshapen_key(tmp_path):
  torch.manual_seed(13)
  model = transformers.CLIPVisionModelWithProjection(_hf_vision_config(hidden_act='gelu_new'))
  model.save_pretrained(tmp_path / 'gelu_new')
  with pytest.raises(convert.ConversionError, match="hidden_act='gelu_new'"):
    convert.convert_encoder('hf-clip', tmp_path / 'gelu_new', tmp_path / 'a')
  folder = tmp_path / 'bad'
  transformers.CLIPVisionModelWithProjection(_hf_vision_config()).save_pretrained(folder)
  doc = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps(dict(doc, intermediate_size=128)))
  with pytest.raises(convert.ConversionError, match=r'layers\.0\.mlp\.fc1\.weight: checkpoint'):
    convert.convert_encoder('hf-clip', folder, tmp_path / 'b')


# ------------------------------------------------------------------ random encoders, saliency


def test_random_encoders_and_dino_saliency(tmp_path):
  enc = encoders.write_random_encoder(tmp_path / 'vit', 'vit', vit_lib.CONFIGS['tiny'], seed=1)
  clip_enc = encoders.write_random_encoder(
    tmp_path / 'clip', 'clip', clip_lib.CONFIGS['tiny'], seed=1
  )
  assert clip_enc.embed(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 32)
  with pytest.raises(encoders.EncoderError, match='no CLS attention'):
    saliency.dino_saliency(clip_enc)
  images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 20, 20, 1), minval=-1, maxval=1))
  sal = jax.jit(saliency.dino_saliency(enc))(enc.params, images)
  assert sal.shape == (2, 20, 20)
  # By hand: prepare, attention averaged over heads on the 4x4 grid, bilinear (PyTorch's).
  attn = np.asarray(enc.cls_attention(enc.prepare(images)))  # [2, heads, 16]
  grid = torch.from_numpy(attn.mean(axis=1).reshape(2, 1, 4, 4))
  want = torch.nn.functional.interpolate(grid, size=(20, 20), mode='bilinear', align_corners=False)
  np.testing.assert_allclose(np.asarray(sal), want[:, 0].numpy(), atol=1e-6)
  assert float(sal.min()) > 0.0 and float(attn.sum(-1).max()) < 1.0
