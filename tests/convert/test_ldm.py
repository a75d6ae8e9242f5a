"""Latent diffusion targets: a diffusers LDMPipeline converts and computes what diffusers computes.

Random diffusers pipelines (VQModel, UNet2DModel, DDIMScheduler; every tensor random, GroupNorms
included, so a swapped or transposed tensor shows) are saved with ``save_pretrained``, converted
with ``--format=diffusers-ldm`` and loaded with ``drc_jax.load_target``. ``encode``, ``decode`` and
``apply`` must match diffusers within 1e-4 of max(1, max |value|): absolute for outputs within
[-1, 1], relative to the largest value where the random weights make outputs large.

``decode`` quantises: its inputs are codebook vectors plus noise far smaller than the codebook's
spacing, so the nearest vector is unambiguous (torch's and our float32 distances may order an
exact near-tie differently; see drc_jax.models.vq).
"""

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='diffusers import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')

from drc_jax import convert, load_target
from drc_jax.convert import diffusers_ldm  # pylint: disable=g-import-not-at-top,wrong-import-position
from drc_jax.targets import checkpoints

TOL = 1e-4

CONFIGS = {
  # Attention in the VQ's second level, codebook width 3 != latent_channels 4, multi-head UNet.
  'tiny': {
    'vq': dict(
      block_out_channels=(32, 64),
      down_block_types=('DownEncoderBlock2D', 'AttnDownEncoderBlock2D'),
      up_block_types=('AttnUpDecoderBlock2D', 'UpDecoderBlock2D'),
      layers_per_block=1,
      latent_channels=4,
      vq_embed_dim=3,
      num_vq_embeddings=64,
      norm_num_groups=8,
      scaling_factor=0.5,
    ),
    'unet': dict(
      sample_size=8,
      in_channels=3,
      out_channels=3,
      block_out_channels=(32, 64),
      down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
      up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=8,
      layers_per_block=1,
      norm_num_groups=8,
    ),
    'batch': 4,
  },
  # CompVis ffhq-ldm-vq-4 (diffusers_ldm.FFHQ_LDM_VQ4); LatentDiffusion's scale_factor 1.0 (the
  # VQ models are not rescaled)
  'ffhq': {
    'vq': dict(diffusers_ldm.FFHQ_LDM_VQ4['vq'], scaling_factor=1.0),
    'unet': diffusers_ldm.FFHQ_LDM_VQ4['unet'],
    'batch': 1,
  },
}
# Three levels, no mid-block attention, single-head UNet, no recorded scaling factor.
OTHER = {
  'vq': dict(
    block_out_channels=(16, 32, 32),
    down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D', 'AttnDownEncoderBlock2D'),
    up_block_types=('AttnUpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'),
    layers_per_block=2,
    latent_channels=2,
    num_vq_embeddings=32,
    norm_num_groups=4,
    mid_block_add_attention=False,
  ),
  'unet': dict(
    sample_size=4,
    in_channels=2,
    out_channels=2,
    block_out_channels=(16, 32),
    down_block_types=('AttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'AttnUpBlock2D'),
    attention_head_dim=None,
    layers_per_block=2,
    norm_num_groups=4,
  ),
  'batch': 2,
}
SCHEDULER = dict(
  num_train_timesteps=1000,
  beta_start=0.0015,
  beta_end=0.0195,
  beta_schedule='scaled_linear',
  clip_sample=False,
  set_alpha_to_one=False,
)


def _perturb(module, seed, scale=0.1):
  """Perturbs the vectors (GroupNorm scales and shifts start as ones and zeros); conv and linear
  weights and biases are random already (torch's init), and drawing 300M normals is slow."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def _pipeline(spec, seed):
  """A random LDMPipeline whose codebook is spread out (N(0, 1)) like a trained one's."""
  torch.manual_seed(seed)
  vq = _perturb(diffusers.VQModel(**spec['vq']), seed)
  with torch.no_grad():
    vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
  unet = _perturb(diffusers.UNet2DModel(**spec['unet']), seed + 1)
  return diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=diffusers.DDIMScheduler(**SCHEDULER))


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def _inputs(pipe, spec, seed=0):
  """Images, near-codebook latents, UNet latents and timesteps; diffusers' outputs on them."""
  rng = np.random.default_rng(seed)
  b, r = spec['batch'], spec['unet']['sample_size']
  f = 2 ** (len(spec['vq']['block_out_channels']) - 1)
  c = spec['unet']['in_channels']
  x = rng.uniform(-1, 1, (b, r * f, r * f, 3)).astype(np.float32)
  codebook = pipe.vqvae.quantize.embedding.weight.detach()
  codes = rng.integers(0, len(codebook), (b, r, r))
  # Each latent: its code plus noise of 5% of the distance to the code's nearest neighbour.
  dist = torch.cdist(codebook[codes.reshape(-1)], codebook)  # [b*r*r, K]
  dist[np.arange(dist.shape[0]), codes.reshape(-1)] = np.inf
  spacing = dist.min(dim=1).values.numpy().reshape(b, r, r, 1)
  noise = rng.normal(0, 1, (b, r, r, c)) * 0.05 * spacing / np.sqrt(c)
  z_q = (codebook.numpy()[codes] + noise).astype(np.float32)
  z = rng.normal(0, 1, (b, r, r, c)).astype(np.float32)
  t = np.array([0, 17, 500, 999][:b] if b > 1 else [500])
  with torch.no_grad():
    want = {
      'encode': _nhwc(pipe.vqvae.encode(_nchw(x)).latents),
      'decode': _nhwc(pipe.vqvae.decode(_nchw(z_q)).sample),
      'codes': pipe.vqvae.quantize(_nchw(z_q))[2][2].reshape(b, r, r).numpy(),
      'apply': _nhwc(pipe.unet(_nchw(z), torch.from_numpy(t)).sample),
    }
  assert (want['codes'] == codes).all()  # the noise keeps every latent nearest to its code
  return (x, z_q, z, t), want


def _err(ours, want):
  """max |ours - want| / max(1, max |want|)."""
  ours = np.asarray(ours)
  assert ours.shape == want.shape and np.abs(want).max() > 0.1
  return float(np.abs(ours - want).max() / max(1.0, np.abs(want).max()))


def _check(target, inputs, want):
  x, z_q, z, t = inputs
  errs = {
    'encode': _err(target.encode(x), want['encode']),
    'decode': _err(target.decode(z_q), want['decode']),
    'apply': _err(target.apply(z, t), want['apply']),
  }
  print(errs)  # pytest -s shows the numbers
  assert all(e <= TOL for e in errs.values()), errs
  codes = target.autoencoder.codes(target.autoencoder_params, z_q)
  np.testing.assert_array_equal(np.asarray(codes), want['codes'])


@pytest.mark.parametrize('name', ['tiny', 'ffhq'])
def test_ldm_matches_diffusers(tmp_path, name):
  spec = CONFIGS[name]
  pipe = _pipeline(spec, 3)
  inputs, want = _inputs(pipe, spec)
  pipe.save_pretrained(tmp_path / 'pipe')
  del pipe
  gc.collect()
  converted = convert.convert('diffusers-ldm', tmp_path / 'pipe', tmp_path / 'w')
  target = load_target(tmp_path / 'w')
  assert target.is_latent and converted.latent == target.latent
  r, c = spec['unet']['sample_size'], spec['unet']['in_channels']
  f = 2 ** (len(spec['vq']['block_out_channels']) - 1)
  assert target.latent_shape == (r, r, c) and target.image_shape == (r * f, r * f, 3)
  assert target.downsampling_factor == f
  assert target.scaling_factor == spec['vq']['scaling_factor']
  assert target.config.attn_head_dim == spec['unet']['attention_head_dim']
  doc = json.loads((tmp_path / 'w' / 'model.json').read_text())
  assert doc['diffusion'] == {
    'num_timesteps': 1000,
    'beta_schedule': 'scaled_linear',
    'beta_start': 0.0015,
    'beta_end': 0.0195,
  }
  # diffusers' DDIM betas: linspace(sqrt(0.0015), sqrt(0.0195), 1000) ** 2.
  ddim = diffusers.DDIMScheduler(**SCHEDULER)
  np.testing.assert_allclose(target.schedule.betas, ddim.betas.numpy(), rtol=1e-6)
  _check(target, inputs, want)


def test_cli_other_layout_and_scaling_override(tmp_path):
  """Three VQ levels, no mid attention, one-head UNet; the CLI records --scaling_factor."""
  pipe = _pipeline(OTHER, 5)
  inputs, want = _inputs(pipe, OTHER, seed=1)
  pipe.save_pretrained(tmp_path / 'pipe')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'drc_jax.convert', '--format=diffusers-ldm']
  subprocess.run(
    cmd + [f'--src={tmp_path / "pipe"}', f'--workdir={tmp_path / "w"}', '--scaling_factor=0.7'],
    check=True,
    env=env,
    cwd=repo,
  )
  target = load_target(tmp_path / 'w' / 'checkpoints' / '0')  # a step directory loads too
  assert target.scaling_factor == 0.7 and target.config.attn_head_dim is None
  assert target.latent_shape == (4, 4, 2) and target.image_shape == (16, 16, 3)
  _check(target, inputs, want)
  done = subprocess.run(
    cmd + [f'--src={tmp_path / "pipe"}', f'--workdir={tmp_path / "w2"}', '--weights=net'],
    env=env,
    cwd=repo,
    capture_output=True,
    text=True,
  )
  assert done.returncode != 0 and '--weights applies to --format=pytorch-ddpm' in done.stderr


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope='module')
def tiny_pipe(tmp_path_factory):
  path = tmp_path_factory.mktemp('ldm') / 'pipe'
  _pipeline(CONFIGS['tiny'], 7).save_pretrained(path)
  return path


def _copy(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(src, dst)
  return dst


def _edit_json(path, **changes):
  doc = json.loads(path.read_text())
  doc.update(changes)
  path.write_text(json.dumps(doc))


def test_missing_parts_are_named(tmp_path, tiny_pipe):
  import shutil  # pylint: disable=g-import-not-at-top

  for part in ('vqvae', 'unet', 'scheduler'):
    pipe = _copy(tiny_pipe, tmp_path / f'no_{part}')
    shutil.rmtree(pipe / part)
    with pytest.raises(convert.ConversionError, match=f'no_{part}/{part}: missing'):
      convert.convert('diffusers-ldm', pipe, tmp_path / f'w_{part}')
    assert not (tmp_path / f'w_{part}').exists()
  pipe = _copy(tiny_pipe, tmp_path / 'no_weights')
  (pipe / 'vqvae' / 'diffusion_pytorch_model.safetensors').unlink()
  with pytest.raises(convert.ConversionError, match='vqvae: no diffusion_pytorch_model'):
    convert.convert('diffusers-ldm', pipe, tmp_path / 'w')


@pytest.mark.parametrize(
  'part,field,value',
  [
    ('vqvae', 'norm_type', 'spatial'),
    ('vqvae', 'act_fn', 'gelu'),
    ('vqvae', 'some_new_field', 1),
    ('vqvae', 'down_block_types', ['DownEncoderBlock2D', 'SkipDownBlock2D']),
    ('vqvae', 'scaling_factor', -1.0),
    ('unet', 'attention_head_dim', 24),
    ('unet', 'class_embed_type', 'timestep'),
    ('unet', 'in_channels', 4),
    ('scheduler', 'beta_schedule', 'sigmoid'),
    ('scheduler', 'rescale_betas_zero_snr', True),
    ('scheduler', 'prediction_type', 'v_prediction'),
  ],
)
def test_unsupported_fields_are_named(tmp_path, tiny_pipe, part, field, value):
  pipe = _copy(tiny_pipe, tmp_path / 'pipe')
  name = 'scheduler_config.json' if part == 'scheduler' else 'config.json'
  _edit_json(pipe / part / name, **{field: value})
  with pytest.raises(convert.ConversionError, match=field):
    convert.convert('diffusers-ldm', pipe, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_mismatched_weights_and_options(tmp_path, tiny_pipe):
  pipe = _copy(tiny_pipe, tmp_path / 'pipe')
  _edit_json(pipe / 'vqvae' / 'config.json', num_vq_embeddings=128)
  with pytest.raises(convert.ConversionError, match=r'quantize\.embedding\.weight: checkpoint'):
    convert.convert('diffusers-ldm', pipe, tmp_path / 'w')
  with pytest.raises(convert.ConversionError, match='not a multiple of the VQ factor 2'):
    convert.convert('diffusers-ldm', tiny_pipe, tmp_path / 'w', resolution=17)
  with pytest.raises(convert.ConversionError, match='scaling_factor applies to latent'):
    convert.convert('diffusers', tiny_pipe, tmp_path / 'w', scaling_factor=1.0)
  with pytest.raises(convert.ConversionError, match='beta_start=0.001 contradicts'):
    convert.convert('diffusers-ldm', tiny_pipe, tmp_path / 'w', diffusion={'beta_start': 0.001})


def test_scaling_factor_defaults(tiny_pipe):
  config = json.loads((tiny_pipe / 'vqvae' / 'config.json').read_text())
  assert diffusers_ldm.vq_config(config)[1] == 0.5
  config.pop('scaling_factor')
  cfg, recorded = diffusers_ldm.vq_config(config)
  assert recorded is None and cfg.vq_embed_dim == 3 and cfg.latent_channels == 4


def test_unrecorded_scaling_and_damaged_autoencoder(tmp_path, tiny_pipe):
  pipe = _copy(tiny_pipe, tmp_path / 'pipe')
  config = json.loads((pipe / 'vqvae' / 'config.json').read_text())
  config.pop('scaling_factor')
  (pipe / 'vqvae' / 'config.json').write_text(json.dumps(config))
  convert.convert('diffusers-ldm', pipe, tmp_path / 'w')
  assert load_target(tmp_path / 'w').scaling_factor == 1.0  # CompVis VQ LDMs, not 0.18215
  with pytest.raises(convert.ConversionError, match='exists: convert into a fresh workdir'):
    convert.convert('diffusers-ldm', pipe, tmp_path / 'w')
  weights = tmp_path / 'w' / 'autoencoder' / 'weights.safetensors'
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(checkpoints.CheckpointError, match='weights.safetensors: SHA-256'):
    load_target(tmp_path / 'w')
  doc = json.loads((tmp_path / 'w' / 'model.json').read_text())
  doc['latent'].pop('scaling_factor')
  (tmp_path / 'w' / 'model.json').write_text(json.dumps(doc))
  with pytest.raises(checkpoints.CheckpointError, match='latent section needs keys'):
    load_target(tmp_path / 'w')
