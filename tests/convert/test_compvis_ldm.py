"""``--format=compvis-ldm``: an original CompVis latent-diffusion ``.ckpt`` converts to the same
target as the diffusers ``LDMPipeline`` it corresponds to.

The CompVis state dicts are made here from random diffusers pipelines by the inverse of diffusers'
conversion scripts, written in the construction order of openaimodel's UNetModel and taming's
Encoder/Decoder. That inverse is itself checked against diffusers' own code: its
``convert_ldm_unet_checkpoint`` and ``convert_ldm_vae_checkpoint`` must map the made state dicts
back to the pipeline's tensors, the qkv split of diffusers'
scripts/convert_ldm_original_checkpoint_to_diffusers.py must recover q, k and v, and openaimodel's
attention (QKVAttentionLegacy and QKVAttention, as written there) on the fused tensors must
compute what the diffusers attention block computes.
"""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='CompVis import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='CompVis import needs the torch extra')
yaml = pytest.importorskip('yaml')

from diffusers.loaders import single_file_utils  # noqa: E402

from drc_jax import convert, load_target  # noqa: E402
from drc_jax.convert import compvis_ldm, diffusers_ldm  # noqa: E402
from drc_jax.convert import diffusers as diffusers_lib  # noqa: E402
from drc_jax.convert.common import source_shape  # noqa: E402
from drc_jax.convert.compvis_config import architecture, read_config  # noqa: E402
from drc_jax.models import unet as model_lib  # noqa: E402
from drc_jax.models import vq as vq_lib  # noqa: E402

TOL = 1e-5

# Each case: the CompVis config (model.params of a configs/latent-diffusion/*.yaml) and the
# diffusers configs of the same model, written by hand.
CASES = {
  # Legacy qkv order, heads of 16 channels (2 at width 32, 4 at 64); attention at downsampling 1
  # and 4 (the up level between has an upsampler without attention, output_blocks.i.1.conv); VQ
  # attention at 16 px, z_channels 4 != embed_dim 3; CompVis 'linear' (sqrt-linear) schedule.
  'small': {
    'compvis': {
      'linear_start': 0.0015,
      'linear_end': 0.0195,
      'timesteps': 1000,
      'image_size': 16,
      'channels': 3,
      'unet_config': {
        'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel',
        'params': {
          'image_size': 16,
          'in_channels': 3,
          'out_channels': 3,
          'model_channels': 32,
          'attention_resolutions': [1, 4],
          'num_res_blocks': 2,
          'channel_mult': [1, 2, 2],
          'num_head_channels': 16,
        },
      },
      'first_stage_config': {
        'target': 'ldm.models.autoencoder.VQModelInterface',
        'params': {
          'embed_dim': 3,
          'n_embed': 64,
          'ddconfig': {
            'double_z': False,
            'z_channels': 4,
            'resolution': 32,
            'in_channels': 3,
            'out_ch': 3,
            'ch': 32,
            'ch_mult': [1, 2],
            'num_res_blocks': 1,
            'attn_resolutions': [16],
            'dropout': 0.0,
          },
          'lossconfig': {'target': 'torch.nn.Identity'},
        },
      },
      'cond_stage_config': '__is_unconditional__',
    },
    'vq': dict(
      block_out_channels=(32, 64),
      down_block_types=('DownEncoderBlock2D', 'AttnDownEncoderBlock2D'),
      up_block_types=('AttnUpDecoderBlock2D', 'UpDecoderBlock2D'),
      layers_per_block=1,
      latent_channels=4,
      vq_embed_dim=3,
      num_vq_embeddings=64,
      norm_num_groups=32,
      scaling_factor=1.0,
    ),
    'unet': dict(
      sample_size=16,
      in_channels=3,
      out_channels=3,
      block_out_channels=(32, 64, 64),
      down_block_types=('AttnDownBlock2D', 'DownBlock2D', 'AttnDownBlock2D'),
      up_block_types=('AttnUpBlock2D', 'UpBlock2D', 'AttnUpBlock2D'),
      attention_head_dim=16,
      layers_per_block=2,
      norm_num_groups=32,
    ),
    'scheduler': dict(beta_schedule='scaled_linear', beta_start=0.0015, beta_end=0.0195),
    'head_channels': 16,
    'new_order': False,
  },
  # QKVAttention (new order) with num_heads=2; a VQ without attention (attn_type 'none': no mid
  # attention either), three levels; CompVis 'sqrt_linear' (our linear) schedule; no EMA.
  'other': {
    'compvis': {
      'beta_schedule': 'sqrt_linear',
      'linear_start': 0.0001,
      'linear_end': 0.02,
      'timesteps': 500,
      'scale_factor': 0.8,
      'unet_config': {
        'params': {
          'image_size': 8,
          'in_channels': 3,
          'out_channels': 3,
          'model_channels': 32,
          'attention_resolutions': [2],
          'num_res_blocks': 1,
          'channel_mult': [1, 2],
          'num_heads': 2,
          'use_new_attention_order': True,
        },
      },
      'first_stage_config': {
        'target': 'ldm.models.autoencoder.VQModelInterface',
        'params': {
          'embed_dim': 3,
          'n_embed': 32,
          'ddconfig': {
            'double_z': False,
            'z_channels': 3,
            'resolution': 32,
            'in_channels': 3,
            'out_ch': 3,
            'ch': 32,
            'ch_mult': [1, 1, 2],
            'num_res_blocks': 1,
            'attn_resolutions': [32],
            'attn_type': 'none',
          },
        },
      },
    },
    'vq': dict(
      block_out_channels=(32, 32, 64),
      down_block_types=('DownEncoderBlock2D',) * 3,
      up_block_types=('UpDecoderBlock2D',) * 3,
      layers_per_block=1,
      latent_channels=3,
      vq_embed_dim=3,
      num_vq_embeddings=32,
      norm_num_groups=32,
      mid_block_add_attention=False,
      scaling_factor=0.8,
    ),
    'unet': dict(
      sample_size=8,
      in_channels=3,
      out_channels=3,
      block_out_channels=(32, 64),
      down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
      up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=32,
      layers_per_block=1,
      norm_num_groups=32,
    ),
    'scheduler': dict(
      num_train_timesteps=500, beta_schedule='linear', beta_start=0.0001, beta_end=0.02
    ),
    'num_heads': 2,
    'new_order': True,
  },
}

# configs/latent-diffusion/ffhq-ldm-vq-4.yaml of CompVis/latent-diffusion (model section).
FFHQ_YAML = """
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    image_size: 64
    channels: 3
    monitor: val/loss_simple_ema
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 224
        attention_resolutions:
        - 8
        - 4
        - 2
        num_res_blocks: 2
        channel_mult:
        - 1
        - 2
        - 3
        - 4
        num_head_channels: 32
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ckpt_path: models/first_stage_models/vq-f4/model.ckpt
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config: __is_unconditional__
"""
FFHQ_DIFFUSERS = diffusers_ldm.FFHQ_LDM_VQ4  # the same model as diffusers configs


# ----------------------------------------------------------------------------- diffusers -> CompVis

_RES = {  # diffusers ResnetBlock2D -> openaimodel ResBlock (renew_resnet_paths, inverted)
  'norm1': 'in_layers.0',
  'conv1': 'in_layers.2',
  'time_emb_proj': 'emb_layers.1',
  'norm2': 'out_layers.0',
  'conv2': 'out_layers.3',
  'conv_shortcut': 'skip_connection',
}


class _Writer:
  """Copies diffusers tensors to CompVis names, counting uses (each must be used once)."""

  def __init__(self, sd, prefix):
    self.sd, self.prefix, self.out, self.used = sd, prefix, {}, []

  def take(self, key):
    self.used.append(key)
    return self.sd[key]

  def put(self, dst, src):
    self.out[self.prefix + dst] = self.take(src)

  def leaves(self, dst, src):
    for leaf in ('weight', 'bias'):
      if f'{src}.{leaf}' in self.sd:
        self.put(f'{dst}.{leaf}', f'{src}.{leaf}')

  def resnet(self, dst, src, names):
    for theirs, ours in names.items():
      self.leaves(f'{dst}.{ours}', f'{src}.{theirs}')

  def check(self):
    assert sorted(self.used) == sorted(self.sd), set(self.sd) ^ set(self.used)
    return self.out


def _heads(case, width):
  """openaimodel's head count of an attention block of this width."""
  return width // case['head_channels'] if 'head_channels' in case else case['num_heads']


def compvis_unet(sd, case):
  """openaimodel UNetModel tensors (prefix model.diffusion_model.) of a diffusers UNet2DModel."""
  u = case['unet']
  levels, nrb = len(u['block_out_channels']), u['layers_per_block']
  attn = [t == 'AttnDownBlock2D' for t in u['down_block_types']]
  new_order = case['new_order']
  w = _Writer(sd, 'model.diffusion_model.')

  def attention(dst, src):
    w.leaves(f'{dst}.norm', f'{src}.group_norm')
    for leaf in ('weight', 'bias'):
      q, k, v = (w.take(f'{src}.to_{p}.{leaf}') for p in 'qkv')
      if new_order:  # QKVAttention: q, k, v = qkv.chunk(3)
        qkv = torch.cat([q, k, v])
      else:  # the inverse of the conversion script's reshape(heads, 3 * d).split(d)
        heads = _heads(case, q.shape[0])
        d = q.shape[0] // heads
        qkv = torch.cat([t.reshape((heads, d) + t.shape[1:]) for t in (q, k, v)], dim=1)
        qkv = qkv.reshape((3 * q.shape[0],) + q.shape[1:])
      w.out[f'{w.prefix}{dst}.qkv.{leaf}'] = qkv[..., None] if leaf == 'weight' else qkv
    proj = w.take(f'{src}.to_out.0.weight')
    w.out[f'{w.prefix}{dst}.proj_out.weight'] = proj[..., None]
    w.put(f'{dst}.proj_out.bias', f'{src}.to_out.0.bias')

  w.leaves('time_embed.0', 'time_embedding.linear_1')
  w.leaves('time_embed.2', 'time_embedding.linear_2')
  w.leaves('input_blocks.0.0', 'conv_in')
  i = 1
  for level in range(levels):  # UNetModel.__init__: input_blocks in construction order
    for j in range(nrb):
      w.resnet(f'input_blocks.{i}.0', f'down_blocks.{level}.resnets.{j}', _RES)
      if attn[level]:
        attention(f'input_blocks.{i}.1', f'down_blocks.{level}.attentions.{j}')
      i += 1
    if level != levels - 1:
      w.leaves(f'input_blocks.{i}.0.op', f'down_blocks.{level}.downsamplers.0.conv')
      i += 1
  w.resnet('middle_block.0', 'mid_block.resnets.0', _RES)
  attention('middle_block.1', 'mid_block.attentions.0')
  w.resnet('middle_block.2', 'mid_block.resnets.1', _RES)
  i = 0
  for b, level in enumerate(reversed(range(levels))):  # output_blocks, deepest level first
    for j in range(nrb + 1):
      w.resnet(f'output_blocks.{i}.0', f'up_blocks.{b}.resnets.{j}', _RES)
      n = 1
      if attn[level]:
        attention(f'output_blocks.{i}.1', f'up_blocks.{b}.attentions.{j}')
        n = 2
      if level and j == nrb:
        w.leaves(f'output_blocks.{i}.{n}.conv', f'up_blocks.{b}.upsamplers.0.conv')
      i += 1
  w.leaves('out.0', 'conv_norm_out')
  w.leaves('out.2', 'conv_out')
  return w.check()


def compvis_vq(sd, case):
  """taming VQModel tensors (prefix first_stage_model.) of a diffusers VQModel."""
  v = case['vq']
  levels, nrb = len(v['block_out_channels']), v['layers_per_block']
  attn = [t == 'AttnDownEncoderBlock2D' for t in v['down_block_types']]
  # taming ResnetBlock (no temb_proj: temb_channels=0): diffusers' names but nin_shortcut.
  res = {'norm1': 'norm1', 'conv1': 'conv1', 'norm2': 'norm2', 'conv2': 'conv2'}
  res['conv_shortcut'] = 'nin_shortcut'
  w = _Writer(sd, 'first_stage_model.')

  def attention(dst, src):
    w.leaves(f'{dst}.norm', f'{src}.group_norm')
    for theirs, ours in (('to_q', 'q'), ('to_k', 'k'), ('to_v', 'v'), ('to_out.0', 'proj_out')):
      w.out[f'{w.prefix}{dst}.{ours}.weight'] = w.take(f'{src}.{theirs}.weight')[..., None, None]
      w.put(f'{dst}.{ours}.bias', f'{src}.{theirs}.bias')

  def middle(side):
    w.resnet(f'{side}.mid.block_1', f'{side}.mid_block.resnets.0', res)
    if v.get('mid_block_add_attention', True):
      attention(f'{side}.mid.attn_1', f'{side}.mid_block.attentions.0')
    w.resnet(f'{side}.mid.block_2', f'{side}.mid_block.resnets.1', res)

  w.leaves('encoder.conv_in', 'encoder.conv_in')
  for level in range(levels):  # Encoder.__init__
    for j in range(nrb):
      w.resnet(f'encoder.down.{level}.block.{j}', f'encoder.down_blocks.{level}.resnets.{j}', res)
      if attn[level]:
        attention(f'encoder.down.{level}.attn.{j}', f'encoder.down_blocks.{level}.attentions.{j}')
    if level != levels - 1:
      w.leaves(
        f'encoder.down.{level}.downsample.conv', f'encoder.down_blocks.{level}.downsamplers.0.conv'
      )
  middle('encoder')
  w.leaves('encoder.norm_out', 'encoder.conv_norm_out')
  w.leaves('encoder.conv_out', 'encoder.conv_out')
  w.leaves('decoder.conv_in', 'decoder.conv_in')
  middle('decoder')
  for level in reversed(range(levels)):  # Decoder.__init__: self.up.insert(0, up)
    b = levels - 1 - level
    for j in range(nrb + 1):
      w.resnet(f'decoder.up.{level}.block.{j}', f'decoder.up_blocks.{b}.resnets.{j}', res)
      if attn[level]:
        attention(f'decoder.up.{level}.attn.{j}', f'decoder.up_blocks.{b}.attentions.{j}')
    if level:
      w.leaves(f'decoder.up.{level}.upsample.conv', f'decoder.up_blocks.{b}.upsamplers.0.conv')
  w.leaves('decoder.norm_out', 'decoder.conv_norm_out')
  w.leaves('decoder.conv_out', 'decoder.conv_out')
  for name in ('quant_conv', 'post_quant_conv', 'quantize.embedding'):
    w.leaves(name, name)
  return w.check()


def _buffers(params):
  """DDPM's schedule buffers (register_schedule), from ldm's make_beta_schedule."""
  T, start, end = params.get('timesteps', 1000), params['linear_start'], params['linear_end']
  kind = params.get('beta_schedule', 'linear')
  if kind == 'linear':
    betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
  else:
    assert kind == 'sqrt_linear'
    betas = torch.linspace(start, end, T, dtype=torch.float64)
  abar = torch.cumprod(1 - betas, 0)
  return {
    'betas': betas.float(),
    'alphas_cumprod': abar.float(),
    'alphas_cumprod_prev': torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]).float(),
    'sqrt_alphas_cumprod': abar.sqrt().float(),
  }


def _ema_name(key):
  """LitEma's buffer name of model.diffusion_model.<key>."""
  return 'model_ema.' + key[len('model.') :].replace('.', '')


# ----------------------------------------------------------------------------- fixtures


def _perturb(module, seed, scale=0.1):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def _pipeline(case, seed):
  torch.manual_seed(seed)
  vq = _perturb(diffusers.VQModel(**case['vq']), seed)
  with torch.no_grad():
    vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
  unet = _perturb(diffusers.UNet2DModel(**case['unet']), seed + 1)
  scheduler = diffusers.DDIMScheduler(**case['scheduler'])
  return diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=scheduler)


def _write_case(tmp_path, name, seed, ema=False, fmt='yaml'):
  """(pipeline folder, CompVis .ckpt, config file, pipeline) of a random case."""
  case = CASES[name]
  pipe = _pipeline(case, seed)
  pipe.save_pretrained(tmp_path / 'pipe')
  unet = compvis_unet(pipe.unet.state_dict(), case)
  sd = dict(unet, **compvis_vq(pipe.vqvae.state_dict(), case), **_buffers(case['compvis']))
  if ema:  # EMA holds the pipeline's weights; the training weights are something else
    gen = torch.Generator().manual_seed(seed + 7)
    sd.update({_ema_name(k): v for k, v in unet.items()})
    sd.update({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in unet.items()})
    sd['model_ema.decay'] = torch.tensor(0.9999)
    sd['model_ema.num_updates'] = torch.tensor(1234, dtype=torch.int32)
  torch.save({'state_dict': sd, 'global_step': 1234, 'epoch': 3}, tmp_path / 'model.ckpt')
  config = tmp_path / f'config.{fmt}'
  doc = {
    'model': {'target': 'ldm.models.diffusion.ddpm.LatentDiffusion', 'params': case['compvis']}
  }
  config.write_text(yaml.safe_dump(doc) if fmt == 'yaml' else json.dumps(doc))
  return tmp_path / 'pipe', tmp_path / 'model.ckpt', config, pipe


def _flat(tree):
  return {k: np.asarray(v) for k, v in model_lib.flat_params(tree).items()}


def _assert_same_target(w_ref, w_new, case, seed=0):
  """Same model.json sections, identical parameters, encode/decode/apply within TOL."""
  ref, new = load_target(w_ref), load_target(w_new)
  docs = [json.loads((w / 'model.json').read_text()) for w in (w_ref, w_new)]
  for key in ('unet', 'diffusion', 'latent'):
    assert docs[0][key] == docs[1][key], key
  for a, b in ((ref.params, new.params), (ref.autoencoder_params, new.autoencoder_params)):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
  rng = np.random.default_rng(seed)
  h, w, c = ref.latent_shape
  x = rng.uniform(-1, 1, (2,) + ref.image_shape).astype(np.float32)
  z = rng.normal(0, 1, (2, h, w, c)).astype(np.float32)
  t = np.array([3, 400])
  errs = {
    'encode': np.abs(np.asarray(new.encode(x)) - np.asarray(ref.encode(x))).max(),
    'decode': np.abs(np.asarray(new.decode(z)) - np.asarray(ref.decode(z))).max(),
    'apply': np.abs(np.asarray(new.apply(z, t)) - np.asarray(ref.apply(z, t))).max(),
  }
  print(errs)
  assert all(e <= TOL for e in errs.values()), errs
  assert np.abs(np.asarray(ref.apply(z, t))).max() > 0.1
  return ref, new


# ----------------------------------------------------------------------------- the inverse mapping


def _script_split(tensor, head_channels):
  """scripts/convert_ldm_original_checkpoint_to_diffusers.py: assign_to_checkpoint's split."""
  channels = tensor.shape[0] // 3
  target_shape = (-1, channels) if len(tensor.shape) == 3 else (-1)
  num_heads = tensor.shape[0] // head_channels // 3
  tensor = tensor.reshape((num_heads, 3 * channels // num_heads) + tensor.shape[1:])
  return [p.reshape(target_shape) for p in tensor.split(channels // num_heads, dim=1)]


def _openai_attention(x, sd, prefix, heads, new_order):
  """openaimodel AttentionBlock._forward with QKVAttentionLegacy / QKVAttention."""
  b, c, *spatial = x.shape
  x = x.reshape(b, c, -1)
  xn = torch.nn.functional.group_norm(x, 32, sd[f'{prefix}.norm.weight'], sd[f'{prefix}.norm.bias'])
  qkv = torch.nn.functional.conv1d(xn, sd[f'{prefix}.qkv.weight'], sd[f'{prefix}.qkv.bias'])
  bs, width, length = qkv.shape
  ch = width // (3 * heads)
  scale = 1 / math.sqrt(math.sqrt(ch))
  if new_order:
    q, k, v = qkv.chunk(3, dim=1)
    weight = torch.einsum(
      'bct,bcs->bts',
      (q * scale).view(bs * heads, ch, length),
      (k * scale).view(bs * heads, ch, length),
    )
    a = torch.einsum('bts,bcs->bct', weight.softmax(dim=-1), v.reshape(bs * heads, ch, length))
  else:
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    weight = torch.einsum('bct,bcs->bts', q * scale, k * scale)
    a = torch.einsum('bts,bcs->bct', weight.softmax(dim=-1), v)
  h = torch.nn.functional.conv1d(
    a.reshape(bs, -1, length), sd[f'{prefix}.proj_out.weight'], sd[f'{prefix}.proj_out.bias']
  )
  return (x + h).reshape(b, c, *spatial)


@pytest.mark.parametrize('name', ['small', 'other'])
def test_inverse_mapping_against_diffusers_code(name):
  """The test's CompVis layout is the one diffusers' converters and openaimodel read."""
  case = CASES[name]
  pipe = _pipeline(case, 11)
  unet_sd, vq_sd = pipe.unet.state_dict(), pipe.vqvae.state_dict()
  unet = compvis_unet(unet_sd, case)
  vq = compvis_vq(vq_sd, case)
  # diffusers' single-file UNet converter: every non-attention tensor comes back in place.
  back = single_file_utils.convert_ldm_unet_checkpoint(
    unet, {'layers_per_block': case['unet']['layers_per_block']}
  )
  plain = {k for k in unet_sd if '.attentions.' not in k}
  assert plain <= set(back) and all(torch.equal(back[k], unet_sd[k]) for k in plain)
  prefixes = {k.split('.to_')[0].split('.group_norm')[0] for k in unet_sd if '.attentions.' in k}
  for p in prefixes:  # attention: moved as a whole (norm, qkv, proj_out), split below
    assert {f'{p}.{m}.weight' for m in ('norm', 'qkv', 'proj_out')} <= set(back), p
    if not case['new_order']:
      q, k, v = _script_split(back[f'{p}.qkv.weight'], case['unet']['attention_head_dim'])
      for part, want in zip('qkv', (q, k, v)):
        assert torch.equal(want, unet_sd[f'{p}.to_{part}.weight'])
  # diffusers' VAE converter: all but the codebook and the per-level attentions (KL VAEs have
  # none, so it leaves them under their taming names).
  back = single_file_utils.convert_ldm_vae_checkpoint(vq, dict(case['vq']))
  level_attn = {k for k in vq_sd if '_blocks.' in k and '.attentions.' in k}
  assert set(vq_sd) - set(back) == level_attn | {'quantize.embedding.weight'}
  assert all('.attn.' in k for k in set(back) - set(vq_sd))
  assert all(torch.equal(back[k], vq_sd[k]) for k in set(back) & set(vq_sd))
  # openaimodel's attention on the fused tensors = diffusers' attention block.
  width = pipe.unet.config.block_out_channels[-1]
  x = torch.randn(2, width, 4, 4)
  mid = {k[len('model.diffusion_model.') :]: v for k, v in unet.items()}
  with torch.no_grad():
    want = pipe.unet.mid_block.attentions[0](x)
    got = _openai_attention(x, mid, 'middle_block.1', _heads(case, width), case['new_order'])
  assert _heads(case, width) > 1 and (got - want).abs().max() < 1e-5


def test_ffhq_config_is_the_diffusers_ffhq_model(tmp_path):
  """ffhq-ldm-vq-4.yaml gives test_ldm's ffhq diffusers configs, and at that size every parameter
  has its CompVis tensor (names and shapes from a meta-device diffusers model)."""
  path = tmp_path / 'config.yaml'
  path.write_text(FFHQ_YAML)
  arch = architecture(read_config(path), str(path))
  assert arch.unet == diffusers_lib.diffusers_config(FFHQ_DIFFUSERS['unet'])
  assert arch.vq == diffusers_ldm.vq_config(FFHQ_DIFFUSERS['vq'])[0]
  assert arch.unet.attn_head_dim == 32 and arch.unet.attn_res == (32, 16, 8)
  assert arch.vq.downsampling_factor == 4 and arch.scale_factor == 1.0
  assert arch.diffusion == {
    'num_timesteps': 1000,
    'beta_schedule': 'scaled_linear',
    'beta_start': 0.0015,
    'beta_end': 0.0195,
  }
  case = dict(FFHQ_DIFFUSERS, head_channels=32, new_order=True)
  with torch.device('meta'):
    unet_sd = diffusers.UNet2DModel(**FFHQ_DIFFUSERS['unet']).state_dict()
    vq_sd = diffusers.VQModel(**FFHQ_DIFFUSERS['vq']).state_dict()
  shapes = {}  # (the qkv order does not change shapes; meta tensors cannot be compared anyway)
  for key, v in compvis_vq(vq_sd, case).items():
    shapes[key[len('first_stage_model.') :]] = tuple(v.shape)
  for key, v in compvis_unet(unet_sd, case).items():
    shapes[key[len('model.diffusion_model.') :]] = tuple(v.shape)
  want = {}
  _, unet_abstract = model_lib.abstract_model(arch.unet)
  ours = model_lib.flat_param_shapes(unet_abstract)
  for name, s in compvis_ldm.unet_sources(arch).items():
    key, _, part = s.key.partition(':')
    shape = source_shape(s.kind, ours[name])
    want[key] = (3 * shape[0],) + shape[1:] if part else shape
  _, vq_abstract = vq_lib.abstract_autoencoder(arch.vq)
  ours = model_lib.flat_param_shapes(vq_abstract)
  for name, s in compvis_ldm.vq_sources(arch).items():
    want[s.key] = source_shape(s.kind, ours[name])
  assert want == shapes


# ----------------------------------------------------------------------------- conversion


def test_compvis_ckpt_matches_the_diffusers_pipeline(tmp_path):
  """EMA weights by default; --weights=net takes the training weights; the schedule and step."""
  pipe_dir, ckpt, config, pipe = _write_case(tmp_path, 'small', 3, ema=True)
  convert.convert('diffusers-ldm', pipe_dir, tmp_path / 'w_ref')
  converted = convert.convert('compvis-ldm', ckpt, tmp_path / 'w', config=config)
  assert converted.step == 1234 and converted.source == f'compvis-ldm:{ckpt}'
  assert converted.diffusion['beta_schedule'] == 'scaled_linear'
  _, new = _assert_same_target(tmp_path / 'w_ref', tmp_path / 'w', CASES['small'])
  np.testing.assert_allclose(new.schedule.betas, pipe.scheduler.betas.numpy(), rtol=1e-6)
  assert new.scaling_factor == 1.0 and new.config.attn_head_dim == 16

  net = convert.convert('compvis-ldm', ckpt, tmp_path / 'w_net', config=config, weights='net')
  ema = _flat(converted.params)
  diff = max(np.abs(v - ema[k]).max() for k, v in _flat(net.params).items())
  assert 1e-3 < diff < 0.2  # the training weights, 0.01 * N(0, 1) away from the EMA ones
  for k, v in _flat(net.autoencoder[1]).items():
    np.testing.assert_array_equal(v, _flat(converted.autoencoder[1])[k])


def test_cli_new_attention_order_without_ema(tmp_path):
  """QKVAttention, num_heads, attn_type none, sqrt_linear, scale_factor; the config as JSON."""
  pipe_dir, ckpt, config, _ = _write_case(tmp_path, 'other', 5, fmt='json')
  convert.convert('diffusers-ldm', pipe_dir, tmp_path / 'w_ref')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'drc_jax.convert', '--format=compvis-ldm', f'--src={ckpt}']
  subprocess.run(
    cmd + [f'--workdir={tmp_path / "w"}', f'--config={config}'], check=True, env=env, cwd=repo
  )
  _, new = _assert_same_target(tmp_path / 'w_ref', tmp_path / 'w', CASES['other'])
  assert new.scaling_factor == 0.8 and new.schedule.num_timesteps == 500
  done = subprocess.run(
    cmd + [f'--workdir={tmp_path / "w2"}', f'--config={config}', '--weights=ema'],
    env=env,
    cwd=repo,
    capture_output=True,
    text=True,
  )
  assert done.returncode != 0 and 'no model_ema.* weights' in done.stderr


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp('compvis')
  _, ckpt, config, _ = _write_case(path, 'small', 9)
  return ckpt, config


def _resave(tmp_path, ckpt, edit):
  sd = torch.load(ckpt, weights_only=True)['state_dict']
  edit(sd)
  torch.save({'state_dict': sd}, tmp_path / 'edited.ckpt')
  return tmp_path / 'edited.ckpt'


def test_state_dict_errors_name_compvis_keys(tmp_path, small_ckpt):
  ckpt, config = small_ckpt
  qkv = 'model.diffusion_model.middle_block.1.qkv.weight'
  vq_q = 'first_stage_model.encoder.down.1.attn.0.q.weight'
  cases = [
    (lambda sd: sd.pop(qkv), r'missing keys .*middle_block\.1\.qkv\.weight:q'),
    (lambda sd: sd.pop(vq_q), r'first_stage_model.*missing keys encoder\.down\.1\.attn\.0\.q\.'),
    (lambda sd: sd.update({'cond_stage_model.proj.weight': torch.zeros(2)}), 'cond_stage_model'),
    (lambda sd: sd.update(betas=sd['betas'] * 1.01), 'betas buffer'),
  ]
  for i, (edit, match) in enumerate(cases):
    src = _resave(tmp_path, ckpt, edit)
    with pytest.raises(convert.ConversionError, match=match):
      convert.convert('compvis-ldm', src, tmp_path / f'w{i}', config=config)
    assert not (tmp_path / f'w{i}').exists()
  with pytest.raises(convert.ConversionError, match=r'config\.yaml: config not found'):
    convert.convert('compvis-ldm', src, tmp_path / 'w')  # no config.yaml beside edited.ckpt
  with pytest.raises(convert.ConversionError, match='beta_end=0.02 contradicts'):
    convert.convert(
      'compvis-ldm', ckpt, tmp_path / 'w', config=config, diffusion={'beta_end': 0.02}
    )
  with pytest.raises(convert.ConversionError, match='config applies to compvis-ldm'):
    convert.convert('diffusers', ckpt, tmp_path / 'w', config=config)


def test_lightning_checkpoint_is_refused_with_the_resave_recipe(tmp_path, small_ckpt, monkeypatch):
  """weights_only refuses Lightning's pickled objects: the error says how to re-save."""
  names = ['pytorch_lightning', 'pytorch_lightning.callbacks']
  module = types.ModuleType('pytorch_lightning.callbacks.model_checkpoint')

  class ModelCheckpoint:  # pickled by reference, like Lightning's callback state keys
    pass

  ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, 'ModelCheckpoint'
  module.ModelCheckpoint = ModelCheckpoint
  for n in names:
    monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
  monkeypatch.setitem(sys.modules, module.__name__, module)
  sd = torch.load(small_ckpt[0], weights_only=True)['state_dict']
  torch.save({'state_dict': sd, 'callbacks': {ModelCheckpoint: {}}}, tmp_path / 'pl.ckpt')
  monkeypatch.delitem(sys.modules, module.__name__)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('compvis-ldm', tmp_path / 'pl.ckpt', tmp_path / 'w', config=small_ckpt[1])
  msg = str(e.value)
  assert 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint' in msg
  assert "torch.save({'state_dict': ckpt['state_dict']}, 'model_state.ckpt')" in msg


@pytest.mark.parametrize(
  'path,value,match',
  [
    (('unet_config', 'params', 'use_scale_shift_norm'), True, 'use_scale_shift_norm'),
    (('unet_config', 'params', 'num_head_channels'), -1, 'set num_heads or num_head_channels'),
    (('unet_config', 'params', 'num_heads'), 4, 'num_heads=4'),  # with num_head_channels -1
    (('unet_config', 'params', 'spatial_size'), 3, r"unsupported fields \['spatial_size'\]"),
    (('beta_schedule',), 'sqrt', "beta_schedule='sqrt'"),
    (('parameterization',), 'x0', "parameterization='x0'"),
    (('cond_stage_config',), {'target': 'ldm.modules.encoders.modules.ClassEmbedder'}, 'cond'),
    (('first_stage_config', 'target'), 'ldm.models.autoencoder.AutoencoderKL', 'AutoencoderKL'),
    (('first_stage_config', 'params', 'ddconfig', 'attn_type'), 'linear', 'attn_type'),
    (('first_stage_config', 'params', 'ddconfig', 'double_z'), True, 'double_z'),
    (('first_stage_config', 'params', 'ddconfig', 'ch'), None, r"missing fields \['ch'\]"),
    (('first_stage_config', 'params', 'embed_dim'), 4, 'embed_dim=4'),
  ],
)
def test_config_refusals_name_the_field(path, value, match):
  params = json.loads(json.dumps(CASES['small']['compvis']))
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  if path[-1] == 'num_heads':
    params['unet_config']['params']['num_head_channels'] = -1
  with pytest.raises(convert.ConversionError, match=match):
    architecture(params, 'cfg.yaml')
