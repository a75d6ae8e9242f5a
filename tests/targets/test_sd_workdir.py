"""Stable Diffusion targets (targets/sd.py): the pixel-space variant's workdir, extra model.json
fields, and the random tiny targets (targets/sd_random.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.models import clip_text, clip_tokenizer, unet_cond
from drc_jax.targets import load as load_lib
from drc_jax.targets import sd, sd_random


def _pixel_parts():
  files = clip_tokenizer.vocabulary_files('a photo of a cat, a photo of a dog', 20, 8)
  text_cfg, text_params = sd_random.text_tower(files, 16, 1, 2, 32, seed=1)
  unet_cfg = unet_cond.UNetCondConfig(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 16),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=16,
    num_heads=2,
    norm_num_groups=8,
  )
  return sd.SDParts(
    unet=(unet_cfg, unet_cond.CondUNet.create(unet_cfg, seed=0)[1]),
    vae=None,
    text_encoder=(text_cfg, text_params),
    tokenizer_files=files,
    diffusion=dict(sd_random.SD_DIFFUSION),
    prediction_type='epsilon',
    source='drc_jax',
    step=3,
  )


def test_pixel_space_workdir_round_trips(tmp_path):
  parts = _pixel_parts()
  with pytest.raises(ValueError, match='step'):
    sd.save(tmp_path / 'w', parts, {'step': 4})
  sd.save(tmp_path / 'w', parts, {'trained_on': {'num_members': 2}})
  doc = json.loads((tmp_path / 'w' / 'model.json').read_text())
  assert doc['vae'] is None and doc['scaling_factor'] == 1.0 and doc['source'] == 'drc_jax'
  assert doc['trained_on'] == {'num_members': 2} and doc['step'] == 3
  assert not (tmp_path / 'w' / 'vae.safetensors').exists()
  assert 'vae.safetensors' not in doc['sha256']
  assert load_lib.target_files(tmp_path / 'w')[0].name == 'model.json'

  target = load_lib.load_target(tmp_path / 'w')
  assert isinstance(target, sd.SDTarget) and target.vae is None and target.step == 3
  assert (target.latent_channels, target.downsampling_factor, target.scaling_factor) == (1, 1, 1.0)
  assert not target.is_inpainting and target.tokenizer.max_length == 8
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(target.encode(x), x)
  np.testing.assert_array_equal(target.decode(x), x)
  ctx = target.encode_text(target.tokenize(['a photo of a cat', '']))
  assert ctx.shape == (2, 8, 16)
  out = target.apply(x, jnp.array([1, 999]), ctx)
  mem = sd.from_parts(parts)  # the same model from memory
  np.testing.assert_allclose(out, mem.apply(x, jnp.array([1, 999]), ctx), atol=1e-5)
  assert out.shape == (2, 8, 8, 1)

  (tmp_path / 'w' / 'text_encoder.safetensors').write_bytes(b'x')
  with pytest.raises(sd.checkpoints.CheckpointError, match='text_encoder.safetensors'):
    load_lib.load_target(tmp_path / 'w')


@pytest.mark.parametrize('name', sd_random.RANDOM_TARGETS)
def test_random_tiny_targets(name):
  target = load_lib.load_target(f'random:{name}')
  assert load_lib.target_files(f'random:{name}') == []
  assert isinstance(target, sd.SDTarget) and target.prediction_type == 'epsilon'
  assert target.is_inpainting == name.endswith('-inpaint')
  assert target.in_channels == (9 if target.is_inpainting else 4)
  assert (target.downsampling_factor, target.latent_channels) == (4, 4)
  assert target.schedule.num_timesteps == 1000
  assert isinstance(target.text_encoder.config, clip_text.CLIPTextConfig)
  assert target.text_encoder.config.num_hidden_layers == 2 and target.context_dim == 32
  x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  z = target.scaling_factor * target.encode(x)
  assert z.shape == (8, 8, 8, 4)
  ctx = target.encode_text(target.tokenize(['a photo of a sneaker'] * 8))
  if target.is_inpainting:
    z = jnp.concatenate([z, jnp.ones_like(z[..., :1]), z], axis=-1)
  out = target.apply(z, 500, ctx)
  assert out.shape == (8, 8, 8, 4) and np.isfinite(np.asarray(out)).all()
  assert target.decode(out).shape == (8, 32, 32, 3)
  again = sd_random.random_parts(name, seed=0).unet[1]
  for a, b in zip(
    jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(target.params['unet'])
  ):
    np.testing.assert_array_equal(a, b)  # seeded
  with pytest.raises(sd.checkpoints.CheckpointError, match='sd-tiny'):
    load_lib.load_target('random:sd-huge')
