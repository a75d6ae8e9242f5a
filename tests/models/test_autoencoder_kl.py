"""Stable Diffusion's VAE: a diffusers AutoencoderKL converts and computes what diffusers computes.

Tiny random ``AutoencoderKL`` models (every tensor random, GroupNorms included, so a swapped or
transposed tensor shows) are saved with ``save_pretrained``, read with
``convert.sd_vae.convert_autoencoder_kl`` and compared with diffusers: the posterior mean, the
(clamped) log-variance and ``decode`` within 1e-4 of max(1, max |value|).
"""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip('torch', reason='diffusers import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')

from drc_jax.convert import sd_vae  # pylint: disable=g-import-not-at-top,wrong-import-position
from drc_jax.convert.common import ConversionError  # pylint: disable=g-import-not-at-top
from drc_jax.models import autoencoder_kl as kl_lib  # pylint: disable=g-import-not-at-top

TOL = 1e-4

CONFIGS = {
  # Attention in the second level and the middle, quant convs; its logvar bias pushed past both
  # ends of the clamp.
  'attn': dict(
    block_out_channels=(32, 64),
    down_block_types=('DownEncoderBlock2D', 'AttnDownEncoderBlock2D'),
    up_block_types=('AttnUpDecoderBlock2D', 'UpDecoderBlock2D'),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.5,
  ),
  # No attention anywhere, no quant convs (SD3's layout), a shift factor, saved as .bin.
  'plain': dict(
    block_out_channels=(16, 32),
    down_block_types=('DownEncoderBlock2D',) * 2,
    up_block_types=('UpDecoderBlock2D',) * 2,
    layers_per_block=1,
    latent_channels=3,
    norm_num_groups=16,
    sample_size=32,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1,
  ),
}


def _vae(spec, seed):
  """A random AutoencoderKL: torch's init, then noise on every tensor (GroupNorm scales and shifts
  start as ones and zeros)."""
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(**spec)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in vae.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
    if vae.quant_conv is not None:  # logvar channels 0 and 1 far past the clamp's ends
      width = spec['latent_channels']
      vae.quant_conv.bias[width] += 40.0
      vae.quant_conv.bias[width + 1] -= 50.0
  return vae.eval()


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _err(ours, want):
  """max |ours - want| / max(1, max |want|)."""
  ours = np.asarray(ours)
  assert ours.shape == want.shape and np.abs(want).max() > 0.1
  return float(np.abs(ours - want).max() / max(1.0, np.abs(want).max()))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """{name: (folder, inputs, diffusers' outputs)} for every config."""
  out = {}
  for i, (name, spec) in enumerate(CONFIGS.items()):
    vae = _vae(spec, 3 + i)
    rng = np.random.default_rng(i)
    side, f = spec['sample_size'], 2 ** (len(spec['block_out_channels']) - 1)
    x = rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    z = rng.normal(0, 1, (2, side // f, side // f, spec['latent_channels'])).astype(np.float32)
    with torch.no_grad():
      dist = vae.encode(_nchw(x)).latent_dist
      want = {
        'mean': _nhwc(dist.mean),
        'logvar': _nhwc(dist.logvar),
        'decode': _nhwc(vae.decode(_nchw(z)).sample),
      }
    folder = tmp_path_factory.mktemp(name) / 'vae'
    vae.save_pretrained(folder, safe_serialization=name != 'plain')
    out[name] = (folder, (x, z), want)
  return out


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_diffusers(saved, name):
  folder, (x, z), want = saved[name]
  spec = CONFIGS[name]
  cfg, params = sd_vae.convert_autoencoder_kl(folder)
  assert cfg.use_quant_conv == spec.get('use_quant_conv', True)
  assert cfg.mid_block_add_attention == spec.get('mid_block_add_attention', True)
  assert cfg.scaling_factor == spec.get('scaling_factor', 0.18215)
  assert cfg.shift_factor == spec.get('shift_factor', 0.0)
  assert ('quant_conv' in params) == cfg.use_quant_conv
  assert ('post_quant_conv' in params) == cfg.use_post_quant_conv
  model, _ = kl_lib.abstract_autoencoder_kl(cfg)

  @jax.jit  # one program: compiling each function apart is slow on a busy CPU
  def run(params, x, z):
    return (
      model.encode(params, x),
      model.posterior_mean(params, x),
      model.decode(params, z),
      model.sample(params, jax.random.key(5), x),
      model.sample(params, jax.random.key(6), x),
    )

  (mean, logvar), posterior_mean, decoded, drawn, other = run(params, x, z)
  errs = {
    'mean': _err(mean, want['mean']),
    'logvar': _err(logvar, want['logvar']),
    'posterior_mean': _err(posterior_mean, want['mean']),
    'decode': _err(decoded, want['decode']),
  }
  print(errs)  # pytest -s shows the numbers
  assert all(e <= TOL for e in errs.values()), errs
  if cfg.use_quant_conv:  # the clamp is exercised at both ends
    assert want['logvar'][..., 0].min() == 20.0 and want['logvar'][..., 1].max() == -30.0
  noise = np.asarray(jax.random.normal(jax.random.key(5), mean.shape))
  np.testing.assert_allclose(
    drawn, mean + np.exp(0.5 * np.asarray(logvar)) * noise, rtol=1e-6, atol=1e-5
  )
  assert not np.allclose(drawn, other)
  scaled = kl_lib.scale_latents(cfg, mean)
  np.testing.assert_allclose(
    scaled, (np.asarray(mean) - cfg.shift_factor) * cfg.scaling_factor, rtol=1e-6
  )
  np.testing.assert_allclose(kl_lib.unscale_latents(cfg, scaled), mean, rtol=1e-5, atol=1e-6)


def test_shapes_and_config_round_trip():
  """Latent and image shapes from the abstract params (Flax's eager init is slow on a busy CPU)."""
  cfg = kl_lib.AutoencoderKLConfig(
    block_out_channels=(16, 32), down_block_types=('DownEncoderBlock2D',) * 2,
    up_block_types=('UpDecoderBlock2D',) * 2, norm_num_groups=8, use_post_quant_conv=False,
  )  # fmt: skip
  model, abstract = kl_lib.AutoencoderKL.abstract(cfg)
  assert 'post_quant_conv' not in abstract
  assert abstract['encoder']['conv_out']['kernel'].shape == (3, 3, 32, 8)  # 2 x latent_channels
  assert abstract['quant_conv']['kernel'].shape == (1, 1, 8, 8)
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), np.float32)
  mean, logvar = jax.eval_shape(model.encode, abstract, x)
  assert mean.shape == logvar.shape == (1, 4, 4, 4)
  assert jax.eval_shape(model.decode, abstract, mean).shape == (1, 8, 8, 3)
  assert kl_lib.AutoencoderKLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- configs

SD15 = {  # runwayml/stable-diffusion-v1-5 vae/config.json (no scaling_factor recorded)
  '_class_name': 'AutoencoderKL',
  '_diffusers_version': '0.6.0',
  'act_fn': 'silu',
  'block_out_channels': [128, 256, 512, 512],
  'down_block_types': ['DownEncoderBlock2D'] * 4,
  'in_channels': 3,
  'latent_channels': 4,
  'layers_per_block': 2,
  'norm_num_groups': 32,
  'out_channels': 3,
  'sample_size': 512,
  'up_block_types': ['UpDecoderBlock2D'] * 4,
}


def test_stable_diffusion_configs():
  cfg = kl_lib.AutoencoderKLConfig.from_diffusers_config(SD15)
  assert cfg.scaling_factor == 0.18215 and cfg.shift_factor == 0.0 and cfg.use_quant_conv
  assert cfg.downsampling_factor == 8 and cfg.mid_block_add_attention
  sdxl = dict(SD15, force_upcast=True, scaling_factor=0.13025, sample_size=1024)
  assert kl_lib.AutoencoderKLConfig.from_diffusers_config(sdxl).scaling_factor == 0.13025
  sd3 = dict(
    SD15,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    latents_mean=None,
    latents_std=None,
    mid_block_add_attention=True,
  )
  cfg = kl_lib.AutoencoderKLConfig.from_diffusers_config(sd3)
  assert cfg.shift_factor == 0.0609 and not cfg.use_quant_conv and cfg.latent_channels == 16


@pytest.mark.parametrize(
  'field,value',
  [
    ('norm_type', 'spatial'),
    ('act_fn', 'gelu'),
    ('latents_mean', [0.1] * 4),
    ('latents_std', [1.0] * 4),
    ('some_new_field', 1),
    ('scaling_factor', -1.0),
    ('scaling_factor', None),
    ('shift_factor', 'x'),
    ('use_quant_conv', 'yes'),
    ('mid_block_add_attention', 1),
    ('down_block_types', ['DownEncoderBlock2D', 'SkipDownBlock2D'] * 2),
    ('norm_num_groups', 24),
    ('_class_name', 'VQModel'),
  ],
)
def test_unsupported_config_named(field, value):
  with pytest.raises(ValueError, match=field) as info:
    kl_lib.AutoencoderKLConfig.from_diffusers_config(dict(SD15, **{field: value}), 'v/config.json')
  assert 'v/config.json' in str(info.value)


# ----------------------------------------------------------------------------- converter errors


def _copy(saved, tmp_path, name='attn'):
  return shutil.copytree(saved[name][0], tmp_path / 'vae')


def _edit_weights(folder, edit):
  path = folder / 'diffusion_pytorch_model.safetensors'
  state = safetensors.numpy.load(path.read_bytes())
  edit(state)
  safetensors.numpy.save_file(state, str(path))


def test_converter_errors_name_the_key(saved, tmp_path):
  folder = _copy(saved, tmp_path)
  _edit_weights(folder, lambda s: s.pop('decoder.conv_out.bias'))
  with pytest.raises(ConversionError, match=r'missing keys decoder\.conv_out\.bias'):
    sd_vae.convert_autoencoder_kl(folder)

  def misshapen(s):
    s['quant_conv.weight'] = np.zeros((8, 8, 3, 3), np.float32)

  folder = shutil.copytree(saved['attn'][0], tmp_path / 'vae2')
  _edit_weights(folder, misshapen)
  with pytest.raises(ConversionError, match=r'quant_conv\.weight: checkpoint \(8, 8, 3, 3\)'):
    sd_vae.convert_autoencoder_kl(folder)

  folder = shutil.copytree(saved['attn'][0], tmp_path / 'vae3')
  config = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps(dict(config, use_post_quant_conv=False)))
  with pytest.raises(ConversionError, match=r'unexpected keys post_quant_conv\.bias'):
    sd_vae.convert_autoencoder_kl(folder)
  (folder / 'config.json').write_text(json.dumps(dict(config, norm_type='spatial')))
  with pytest.raises(ConversionError, match=r'config\.json: unsupported norm_type'):
    sd_vae.convert_autoencoder_kl(folder)
  (folder / 'config.json').write_text(json.dumps(config))
  (folder / 'diffusion_pytorch_model.safetensors').unlink()
  with pytest.raises(ConversionError, match='vae3: no diffusion_pytorch_model'):
    sd_vae.convert_autoencoder_kl(folder)
  with pytest.raises(ConversionError, match='not a folder'):
    sd_vae.convert_autoencoder_kl(tmp_path / 'nothing')


def test_pipeline_folder_and_deprecated_attention_names(saved, tmp_path):
  """A pipeline folder finds its vae/; diffusers < 0.14's query/key/value/proj_attn are read."""
  _, params = sd_vae.convert_autoencoder_kl(saved['attn'][0])
  folder = _copy(saved, tmp_path)
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}

  def deprecate(s):
    for k in [k for k in s if '.attentions.' in k]:
      for new, old in renames.items():
        if f'.{new}.' in k:
          s[k.replace(f'.{new}.', f'.{old}.')] = s.pop(k)

  _edit_weights(folder, deprecate)
  assert any('.proj_attn.' in k for k in safetensors.numpy.load_file(
    str(folder / 'diffusion_pytorch_model.safetensors')))  # fmt: skip
  _, old = sd_vae.convert_autoencoder_kl(tmp_path)  # the pipeline folder holding vae/
  jax.tree_util.tree_map(np.testing.assert_array_equal, old, params)
