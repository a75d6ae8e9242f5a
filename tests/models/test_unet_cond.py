"""Stable Diffusion's UNet: a diffusers UNet2DConditionModel converts and computes what diffusers
computes.

Tiny random UNet2DConditionModels (built offline; every tensor random, the GroupNorm and LayerNorm
scales and shifts included, so a swapped or transposed tensor shows) are saved with
``save_pretrained``, converted with ``convert_unet_cond`` and applied to random latents, timesteps
(0 and 999 among them) and text embeddings; the output must match diffusers' within 1e-4 of
max(1, max |value|). The layouts: SD 1.x (1x1-conv projections, one head count for all blocks),
SD 2.x (linear projections, per-block head counts, upcast attention, three levels, two transformer
layers in one block) and inpainting (9 input channels, a head count that does not divide the width,
the other time-embedding order and shift, padding-0 downsampling, weights as a .bin).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip('torch', reason='diffusers import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')

from drc_jax.convert import sd_unet  # pylint: disable=g-import-not-at-top,wrong-import-position
from drc_jax.convert.common import ConversionError  # pylint: disable=g-import-not-at-top
from drc_jax.models import unet_cond  # pylint: disable=g-import-not-at-top,wrong-import-position

TOL = 1e-4
WEIGHTS = 'diffusion_pytorch_model.safetensors'

SPECS = {
  # SD 1.x: Conv2d proj_in/proj_out, attention_head_dim 8 = 8 heads in every transformer.
  'sd1': dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
  ),
  # SD 2.x: Linear projections, heads per block (down (2, 4, 8), up reversed), upcast attention.
  'sd2': dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=24,
    attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 1),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=16,
  ),
  # Inpainting: 9 input channels; 3 heads of 32 // 3 = 10 channels (inner width 30 != 32).
  'inpaint': dict(
    sample_size=8,
    in_channels=9,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=16,
    attention_head_dim=3,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    norm_num_groups=8,
  ),
}


def _unet(spec, seed):
  """A random UNet2DConditionModel; the norms' scales and shifts perturbed (they start at 1, 0)."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**spec)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in unet.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return unet.eval()


def _inputs(spec, seed, t):
  rng = np.random.default_rng(seed)
  b, r = len(t), spec['sample_size']
  z = rng.normal(0, 1, (b, r, r, spec['in_channels'])).astype(np.float32)
  context = rng.normal(0, 1, (b, 7, spec['cross_attention_dim'])).astype(np.float32)
  return z, np.asarray(t), context


def _diffusers(unet, z, t, context):
  with torch.no_grad():
    out = unet(
      torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context)
    ).sample
  return out.permute(0, 2, 3, 1).numpy()


def _err(ours, want):
  """max |ours - want| / max(1, max |want|)."""
  ours = np.asarray(ours)
  assert ours.shape == want.shape and np.abs(want).max() > 0.1
  return float(np.abs(ours - want).max() / max(1.0, np.abs(want).max()))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """name -> (folder, diffusers model): each spec saved once (inpaint as a pickled .bin)."""
  out = {}
  for i, (name, spec) in enumerate(SPECS.items()):
    unet = _unet(spec, 10 + i)
    folder = tmp_path_factory.mktemp(name) / 'unet'
    unet.save_pretrained(folder, safe_serialization=name != 'inpaint')
    out[name] = (folder, unet)
  return out


@pytest.mark.parametrize('name', list(SPECS))
def test_matches_diffusers(saved, name):
  folder, unet = saved[name]
  spec = SPECS[name]
  cfg, params = sd_unet.convert_unet_cond(folder)
  model, _ = unet_cond.abstract_model(cfg)
  apply = jax.jit(model.apply)
  t = [0.0, 421.5, 999.0] if name == 'sd2' else [0, 421, 999]  # float timesteps too
  z, t, context = _inputs(spec, 0, t)
  errs = [_err(apply(params, z, t, context), _diffusers(unet, z, t, context))]
  print(name, errs)  # pytest -s shows the numbers
  assert max(errs) <= TOL, errs


def test_config_reads_diffusers_fields(saved):
  folder, _ = saved['sd2']
  config = json.loads((folder / 'config.json').read_text())
  cfg = unet_cond.UNetCondConfig.from_diffusers_config(config)
  assert cfg.num_heads == (2, 4, 8) and cfg.transformer_layers == (1, 2, 1)
  assert cfg.layers_per_block == (1, 1, 1) and cfg.cross_attention_dim == 24
  assert cfg.use_linear_projection and cfg.upcast_attention and cfg.time_embed_dim == 128
  sd1 = unet_cond.UNetCondConfig.from_diffusers_config(
    json.loads((saved['sd1'][0] / 'config.json').read_text())
  )
  assert sd1.num_heads == (8, 8) and not sd1.use_linear_projection
  assert unet_cond.UNetCondConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_sharded_and_pipeline_folders(saved, tmp_path):
  """Shards listed by an index json convert to the same params; a pipeline folder is accepted."""
  folder, _ = saved['sd1']
  cfg, params = sd_unet.convert_unet_cond(folder)
  state = safetensors.numpy.load((folder / WEIGHTS).read_bytes())
  keys = sorted(state)
  unet_dir = tmp_path / 'pipe' / 'unet'
  unet_dir.mkdir(parents=True)
  (unet_dir / 'config.json').write_text((folder / 'config.json').read_text())
  halves = {'a.safetensors': keys[::2], 'b.safetensors': keys[1::2]}
  for file, part in halves.items():
    safetensors.numpy.save_file({k: state[k] for k in part}, str(unet_dir / file))
  index = {'weight_map': {k: f for f, part in halves.items() for k in part}}
  (unet_dir / f'{WEIGHTS}.index.json').write_text(json.dumps(index))
  cfg2, params2 = sd_unet.convert_unet_cond(tmp_path / 'pipe')
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  half = {k: v.astype(np.float16) for k, v in state.items()}
  safetensors.numpy.save_file(half, str(unet_dir / 'diffusion_pytorch_model.fp16.safetensors'))
  _, params16 = sd_unet.convert_unet_cond(unet_dir, variant='fp16')
  for a, b in zip(jax.tree_util.tree_leaves(params16), jax.tree_util.tree_leaves(params)):
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  index['weight_map'][keys[0]] = 'b.safetensors'  # listed in the wrong shard
  (unet_dir / f'{WEIGHTS}.index.json').write_text(json.dumps(index))
  with pytest.raises(ConversionError, match=r'a\.safetensors: does not hold'):
    sd_unet.convert_unet_cond(unet_dir)


def _variant(saved, tmp_path, edit):
  """A copy of the sd1 folder whose tensors ``edit`` changed (a dict in, a dict out)."""
  folder, _ = saved['sd1']
  out = tmp_path / 'unet'
  out.mkdir(parents=True)
  (out / 'config.json').write_text((folder / 'config.json').read_text())
  state = safetensors.numpy.load((folder / WEIGHTS).read_bytes())
  safetensors.numpy.save_file(edit(dict(state)), str(out / WEIGHTS))
  return out


def test_tensor_errors_are_named(saved, tmp_path):
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'

  def drop(state):
    del state[key]
    return state

  with pytest.raises(ConversionError, match=rf'missing keys {key}'):
    sd_unet.convert_unet_cond(_variant(saved, tmp_path / 'a', drop))

  ff = 'down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight'

  def transpose(state):
    state[ff] = np.ascontiguousarray(state[ff].T)
    return state

  with pytest.raises(
    ConversionError, match=rf'{ff}: checkpoint \(32, 256\) vs expected \(256, 32\)'
  ):
    sd_unet.convert_unet_cond(_variant(saved, tmp_path / 'b', transpose))

  proj = 'up_blocks.1.attentions.0.proj_in.weight'

  def squeeze(state):  # a Linear where config.json says 1x1 conv (use_linear_projection false)
    state[proj] = np.ascontiguousarray(state[proj][:, :, 0, 0])
    return state

  with pytest.raises(ConversionError, match=rf'{proj}: checkpoint \(32, 32\) vs expected'):
    sd_unet.convert_unet_cond(_variant(saved, tmp_path / 'c', squeeze))

  def extra(state):
    state['mid_block.extra.weight'] = np.zeros(3, np.float32)
    return state

  with pytest.raises(ConversionError, match=r'unexpected keys mid_block\.extra\.weight'):
    sd_unet.convert_unet_cond(_variant(saved, tmp_path / 'd', extra))
  with pytest.raises(ConversionError, match='no diffusion_pytorch_model.fp16.safetensors'):
    sd_unet.convert_unet_cond(saved['sd1'][0], variant='fp16')


@pytest.mark.parametrize(
  'field,value',
  [
    ('only_cross_attention', True),
    ('dual_cross_attention', True),
    ('class_embed_type', 'timestep'),
    ('addition_embed_type', 'text'),
    ('time_cond_proj_dim', 8),
    ('encoder_hid_dim', 16),
    ('conv_in_kernel', 5),
    ('resnet_time_scale_shift', 'scale_shift'),
    ('attention_type', 'gated'),
    ('mid_block_only_cross_attention', True),
    ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'),
    ('num_attention_heads', 4),
    ('transformer_layers_per_block', [[1], [1]]),
    ('cross_attention_dim', [32, 16]),
    ('down_block_types', ['SimpleCrossAttnDownBlock2D', 'DownBlock2D']),
    ('attention_head_dim', [8, 8, 8]),
    ('some_new_field', 1),
  ],
)
def test_unsupported_fields_are_named(saved, tmp_path, field, value):
  folder, _ = saved['sd1']
  out = tmp_path / 'unet'
  out.mkdir()
  config = json.loads((folder / 'config.json').read_text())
  config[field] = value
  (out / 'config.json').write_text(json.dumps(config))
  (out / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes())
  with pytest.raises(ConversionError, match=field):
    sd_unet.convert_unet_cond(out)


def test_model_checks_shapes():
  """Shapes are checked when the program is traced (eval_shape: no weights, no compilation)."""
  cfg = unet_cond.UNetCondConfig.from_diffusers_config(SPECS['sd1'])  # the sd1 test's config
  assert cfg.layers_per_block == (1, 1) and cfg.transformer_layers == (1, 1)
  model, params = unet_cond.abstract_model(cfg)
  z, ctx = np.zeros((3, 6, 6, 4), np.float32), np.zeros((3, 5, 32), np.float32)
  out = jax.eval_shape(model.apply, params, z, np.int32(7), ctx)  # a scalar t: every image's
  assert out.shape == (3, 6, 6, 4) and out.dtype == np.float32
  with pytest.raises(ValueError, match='multiples of 2'):
    jax.eval_shape(model.apply, params, np.zeros((3, 5, 6, 4), np.float32), np.array([1]), ctx)
  with pytest.raises(ValueError, match='context'):
    jax.eval_shape(model.apply, params, z, np.array([1]), np.zeros((3, 5, 9), np.float32))
  with pytest.raises(ValueError, match='norm_num_groups'):
    dataclasses.replace(cfg, block_out_channels=(12, 24))
  with pytest.raises(ValueError, match='num_heads'):
    dataclasses.replace(cfg, num_heads=(2, 80))
