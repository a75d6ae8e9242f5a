"""``--format=sd-single-file``: a Stable Diffusion checkpoint in the original CompVis/Stability
layout converts, loads with ``drc_jax.load_target`` and computes what diffusers computes.

Three tiny random diffusers pipelines are built offline with ``tests/convert/test_sd.py``'s
``_pipeline`` (32 GroupNorm groups and text towers 64 wide per head, as the original configs
imply): ``sd1`` (SD 1.x: QuickGELU CLIPTextModel, 1x1-conv projections, epsilon), ``sd2`` (SD 2.x:
OpenCLIP text tower with one more resblock than the pipeline's, for the penultimate layer, linear
projections, heads per block, v-prediction) and ``inpaint`` (a 9-channel UNet). Their weights are
written in the original single-file layout (this file's inverse of diffusers' mapping, with the
schedule buffers; ``sd1`` with a LitEma copy holding the pipeline's UNet and perturbed raw weights),
as ``.safetensors`` and as a ``torch.save`` ``.ckpt``, and an original inference YAML for each.
diffusers' own ``from_single_file`` must read the file back into the pipeline's weights; the
conversions (``--original_config`` + ``--tokenizer``, or ``--config``) must equal the
``diffusers-sd`` conversion of the pipeline folder, tensor file by tensor file, and
``test_sd.test_matches_diffusers``' checks (``tokenize`` exact, ``encode_text``, ``apply``,
``encode``, ``decode`` within 1e-4) must pass.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='diffusers import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')
transformers = pytest.importorskip('transformers', reason='the text tower needs transformers')
yaml = pytest.importorskip('yaml')
safetensors_torch = pytest.importorskip('safetensors.torch')
single_file_utils = pytest.importorskip('diffusers.loaders.single_file_utils')

from drc_jax import convert  # noqa: E402
from drc_jax.convert import sd_single_file  # noqa: E402
from drc_jax.models import unet as unet_lib  # noqa: E402
from drc_jax.targets import checkpoints, sd  # noqa: E402

_spec = importlib.util.spec_from_file_location(
  'sd_single_file_test_sd', os.path.join(os.path.dirname(__file__), 'test_sd.py')
)
test_sd = importlib.util.module_from_spec(_spec)  # our own instance: its globals are ours to set
_spec.loader.exec_module(test_sd)

UNET = dict(
  sample_size=8,
  out_channels=4,
  block_out_channels=(32, 32, 64),
  layers_per_block=2,
  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
  cross_attention_dim=128,
  norm_num_groups=32,
)
TEXT = dict(hidden_size=128, num_attention_heads=2)
SPECS = {
  'sd1': dict(
    pipeline='StableDiffusionPipeline',
    pad='<|endoftext|>',
    unet=dict(UNET, in_channels=4, attention_head_dim=2),
    text=dict(TEXT, hidden_act='quick_gelu'),
    scheduler=('PNDMScheduler', 'epsilon'),
    sharded=False,
  ),
  'sd2': dict(
    pipeline='StableDiffusionPipeline',
    pad='!',
    unet=dict(UNET, in_channels=4, attention_head_dim=(2, 2, 4), use_linear_projection=True),
    text=dict(TEXT, hidden_act='gelu'),
    scheduler=('DDIMScheduler', 'v_prediction'),
    sharded=False,
  ),
  'inpaint': dict(
    pipeline='StableDiffusionInpaintPipeline',
    pad='<|endoftext|>',
    unet=dict(UNET, in_channels=9, attention_head_dim=2),
    text=dict(TEXT, hidden_act='quick_gelu'),
    scheduler=('PNDMScheduler', 'epsilon'),
    sharded=False,
  ),
}
test_sd.SPECS = SPECS
test_sd.VAE = dict(test_sd.VAE, block_out_channels=(32, 64), norm_num_groups=32)
EMA_NAME = 'sd1'  # the spec written with a LitEma copy


def original_yaml(name):
  """The original inference YAML of a spec (v1-inference.yaml's layout, tiny sizes)."""
  spec = SPECS[name]
  unet = {
    'image_size': 32,  # unused: LatentDiffusion's image_size is the latent side
    'in_channels': spec['unet']['in_channels'],
    'out_channels': 4,
    'model_channels': 32,
    'attention_resolutions': [1, 2],
    'num_res_blocks': 2,
    'channel_mult': [1, 1, 2],
    'use_spatial_transformer': True,
    'transformer_depth': 1,
    'context_dim': 128,
    'use_checkpoint': True,
    'legacy': False,
  }
  if name == 'sd2':
    unet.update(num_head_channels=16, use_linear_in_transformer=True, use_fp16=True)
    cond = {
      'target': 'ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder',
      'params': {'freeze': True, 'layer': 'penultimate'},
    }
  else:
    unet['num_heads'] = 2
    cond = {'target': 'ldm.modules.encoders.modules.FrozenCLIPEmbedder'}
  params = {
    'linear_start': 0.00085,
    'linear_end': 0.0120,
    'num_timesteps_cond': 1,
    'timesteps': 1000,
    'first_stage_key': 'jpg',
    'cond_stage_key': 'txt',
    'image_size': 8,
    'channels': 4,
    'conditioning_key': 'hybrid' if name == 'inpaint' else 'crossattn',
    'scale_factor': 0.18215,
    'use_ema': False,
    'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': unet},
    'first_stage_config': {
      'target': 'ldm.models.autoencoder.AutoencoderKL',
      'params': {
        'embed_dim': 4,
        'monitor': 'val/rec_loss',
        'ddconfig': {
          'double_z': True,
          'z_channels': 4,
          'resolution': 16,
          'in_channels': 3,
          'out_ch': 3,
          'ch': 32,
          'ch_mult': [1, 2],
          'num_res_blocks': 1,
          'attn_resolutions': [],
          'dropout': 0.0,
        },
        'lossconfig': {'target': 'torch.nn.Identity'},
      },
    },
    'cond_stage_config': cond,
  }
  if name == 'sd2':
    params['parameterization'] = 'v'
  target = 'LatentInpaintDiffusion' if name == 'inpaint' else 'LatentDiffusion'
  return {'model': {'target': f'ldm.models.diffusion.ddpm.{target}', 'params': params}}


# -------------------------------------------------------------------------- diffusers -> original


def _unet_to_original(key, cfg):
  """openaimodel's name of a diffusers UNet2DConditionModel key (written independently of the
  converter; diffusers' from_single_file checks it)."""
  lpb = cfg.layers_per_block
  resnet = {
    'norm1': 'in_layers.0',
    'conv1': 'in_layers.2',
    'time_emb_proj': 'emb_layers.1',
    'norm2': 'out_layers.0',
    'conv2': 'out_layers.3',
    'conv_shortcut': 'skip_connection',
  }
  top = {
    'time_embedding.linear_1': 'time_embed.0',
    'time_embedding.linear_2': 'time_embed.2',
    'conv_in': 'input_blocks.0.0',
    'conv_norm_out': 'out.0',
    'conv_out': 'out.2',
  }
  module, leaf = key.rsplit('.', 1)
  if module in top:
    return f'{top[module]}.{leaf}'
  parts = key.split('.')
  if parts[0] == 'mid_block':
    if parts[1] == 'resnets':
      return f'middle_block.{2 * int(parts[2])}.{resnet[parts[3]]}.{leaf}'
    return 'middle_block.1.' + '.'.join(parts[3:])
  i, kind = int(parts[1]), parts[2]
  if parts[0] == 'down_blocks':
    first = 1 + i * (lpb + 1)
    if kind == 'downsamplers':
      return f'input_blocks.{first + lpb}.0.op.{leaf}'
    j = int(parts[3])
    if kind == 'resnets':
      return f'input_blocks.{first + j}.0.{resnet[parts[4]]}.{leaf}'
    return f'input_blocks.{first + j}.1.' + '.'.join(parts[4:])
  first = i * (lpb + 1)
  if kind == 'upsamplers':
    sub = 2 if cfg.up_block_types[i].startswith('CrossAttn') else 1
    return f'output_blocks.{first + lpb}.{sub}.conv.{leaf}'
  j = int(parts[3])
  if kind == 'resnets':
    return f'output_blocks.{first + j}.0.{resnet[parts[4]]}.{leaf}'
  return f'output_blocks.{first + j}.1.' + '.'.join(parts[4:])


def _vae_to_original(key, v, levels):
  """(taming name, tensor) of a diffusers AutoencoderKL key (attention Linears as 1x1 convs)."""
  new = key.replace('conv_norm_out', 'norm_out').replace('conv_shortcut', 'nin_shortcut')
  new = re.sub(r'mid_block\.resnets\.(\d)', lambda m: f'mid.block_{int(m[1]) + 1}', new)
  new = re.sub(r'down_blocks\.(\d+)\.resnets', r'down.\1.block', new)
  new = re.sub(r'down_blocks\.(\d+)\.downsamplers\.0', r'down.\1.downsample', new)
  new = re.sub(
    r'up_blocks\.(\d+)\.(resnets|upsamplers\.0)',
    lambda m: f'up.{levels - 1 - int(m[1])}.{"block" if m[2] == "resnets" else "upsample"}',
    new,
  )
  if 'mid_block.attentions.0.' in new:
    new = new.replace('mid_block.attentions.0.', 'mid.attn_1.')
    for a, b in (('group_norm', 'norm'), ('to_q', 'q'), ('to_k', 'k'), ('to_v', 'v')):
      new = new.replace(f'.{a}.', f'.{b}.')
    new = new.replace('.to_out.0.', '.proj_out.')
    if v.ndim == 2:
      v = v[:, :, None, None]
  return new, v


def _text_to_original(state, open_clip, extra_layer, gen):
  """The cond_stage_model.* tensors of a transformers CLIPTextModel state dict."""
  state = {k.removeprefix('text_model.'): v for k, v in state.items()}
  state.pop('embeddings.position_ids', None)
  if not open_clip:
    return {f'cond_stage_model.transformer.text_model.{k}': v for k, v in state.items()}
  p = 'cond_stage_model.model.'
  names = {
    'layer_norm1': 'ln_1',
    'layer_norm2': 'ln_2',
    'self_attn.out_proj': 'attn.out_proj',
    'mlp.fc1': 'mlp.c_fc',
    'mlp.fc2': 'mlp.c_proj',
  }
  out = {
    p + 'token_embedding.weight': state.pop('embeddings.token_embedding.weight'),
    p + 'positional_embedding': state.pop('embeddings.position_embedding.weight'),
    p + 'ln_final.weight': state.pop('final_layer_norm.weight'),
    p + 'ln_final.bias': state.pop('final_layer_norm.bias'),
  }
  layers = 1 + max(int(k.split('.')[2]) for k in state)
  for i in range(layers):
    q = f'encoder.layers.{i}.self_attn.'
    for leaf in ('weight', 'bias'):
      fused = [state.pop(f'{q}{x}_proj.{leaf}') for x in 'qkv']
      out[f'{p}transformer.resblocks.{i}.attn.in_proj_{leaf}'] = torch.cat(fused)
    for ours, theirs in names.items():
      for leaf in ('weight', 'bias'):
        out[f'{p}transformer.resblocks.{i}.{theirs}.{leaf}'] = state.pop(
          f'encoder.layers.{i}.{ours}.{leaf}'
        )
  assert not state, sorted(state)
  if extra_layer:  # the last resblock, which the penultimate layer does not compute
    for k in [k for k in out if '.resblocks.0.' in k]:
      v = out[k]
      out[k.replace('.resblocks.0.', f'.resblocks.{layers}.')] = torch.randn(v.shape, generator=gen)
  width = out[p + 'token_embedding.weight'].shape[1]
  out[p + 'text_projection'] = torch.randn((width, width), generator=gen)
  out[p + 'logit_scale'] = torch.tensor(4.6)
  return out


def to_original(name, pipe, ema=False):
  """The pipeline's weights in the original single-file layout (a dict of CPU tensors)."""
  gen = torch.Generator().manual_seed(7)
  out = {}
  unet = {_unet_to_original(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
  for k, v in unet.items():
    if ema:  # LitEma: the converted copy; the raw weights perturbed
      out['model_ema.' + ('diffusion_model.' + k).replace('.', '')] = v
      v = v + 0.05 * torch.randn(v.shape, generator=gen)
    out['model.diffusion_model.' + k] = v
  if ema:
    out['model_ema.decay'] = torch.tensor(0.9999)
    out['model_ema.num_updates'] = torch.tensor(1234, dtype=torch.int32)
  levels = len(pipe.vae.config.block_out_channels)
  for k, v in pipe.vae.state_dict().items():
    new, v = _vae_to_original(k, v, levels)
    out['first_stage_model.' + new] = v
  text = pipe.text_encoder.state_dict()
  out.update(_text_to_original(text, name == 'sd2', name == 'sd2', gen))
  out['betas'] = pipe.scheduler.betas.float()
  out['alphas_cumprod'] = pipe.scheduler.alphas_cumprod.float()
  return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _save(state, path):
  if path.suffix == '.ckpt':
    torch.save({'state_dict': state, 'global_step': 0}, path)
  else:
    safetensors_torch.save_file(state, str(path))
  return path


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """name -> dict(folder, pipe, state, yaml, st, ckpt, ref): the pipeline, its single files and
  the diffusers-sd conversion of its folder (the reference workdir)."""
  out = {}
  for i, (name, spec) in enumerate(SPECS.items()):
    root = tmp_path_factory.mktemp(name)
    pipe = test_sd._pipeline(spec, root / 'pipe', seed=40 + 10 * i)
    state = to_original(name, pipe, ema=name == EMA_NAME)
    (root / 'orig.yaml').write_text(yaml.safe_dump(original_yaml(name)))
    convert.convert('diffusers-sd', root / 'pipe', root / 'ref')
    out[name] = dict(
      root=root,
      folder=root / 'pipe',
      pipe=pipe,
      state=state,
      yaml=root / 'orig.yaml',
      st=_save(state, root / 'model.safetensors'),
      ckpt=_save(state, root / 'model.ckpt'),
      ref=root / 'ref',
    )
  return out


def _same_weights(got, want):
  got, want = dict(got), dict(want)
  assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:8]
  for k in want:
    np.testing.assert_array_equal(got[k].float().numpy(), want[k].float().numpy(), err_msg=k)


@pytest.mark.parametrize('name', list(SPECS))
def test_diffusers_reads_the_single_file_back(built, name):
  """diffusers' own single-file loader reads our original-layout file into the pipeline's
  weights: the test's layout is the original one."""
  b = built[name]
  kw = dict(config=str(b['folder']), local_files_only=True)
  unet = diffusers.UNet2DConditionModel.from_single_file(
    str(b['st']), subfolder='unet', extract_ema=name == EMA_NAME, **kw
  )
  _same_weights(unet.state_dict(), b['pipe'].unet.state_dict())
  vae = diffusers.AutoencoderKL.from_single_file(str(b['st']), subfolder='vae', **kw)
  _same_weights(vae.state_dict(), b['pipe'].vae.state_dict())
  want = b['pipe'].text_encoder.state_dict()
  if name != 'sd2':
    cls = getattr(diffusers, SPECS[name]['pipeline'])
    pipe = cls.from_single_file(str(b['st']), safety_checker=None, **kw)
    _same_weights({k: v for k, v in pipe.text_encoder.state_dict().items() if k in want}, want)
  else:  # diffusers drops SD 2's resblock 23 by its name: its OpenCLIP mapping, called directly
    got = single_file_utils.convert_open_clip_checkpoint(b['pipe'].text_encoder, b['state'])
    got = {k.removeprefix('text_model.'): v for k, v in got.items()}
    dropped = [k for k in got if k.startswith('encoder.layers.2.')]  # the penultimate layer's
    assert len(dropped) == 16
    _same_weights({k: v for k, v in got.items() if k in want}, want)


def _parts_equal_reference(workdir, ref):
  """The converted tensors are the diffusers-sd conversion's, byte for byte."""
  for part in sd.PARTS:
    name = sd.weights_name(part)
    assert (workdir / name).read_bytes() == (ref / name).read_bytes(), part
  for name in sd.REQUIRED_TOKENIZER_FILES:
    assert (workdir / 'tokenizer' / name).read_bytes() == (ref / 'tokenizer' / name).read_bytes()
  ours = json.loads((workdir / checkpoints.MODEL_JSON).read_text())
  want = json.loads((ref / checkpoints.MODEL_JSON).read_text())
  for key in ('diffusion', 'prediction_type', 'pipeline', 'unet', 'vae', 'scaling_factor'):
    assert ours.get(key) == want.get(key), key
  ids = ('pad_token_id', 'bos_token_id', 'eos_token_id')  # YAML: the tokenizer's
  drop = lambda d: {k: v for k, v in d.items() if k not in ids}
  assert drop(ours['text_encoder']) == drop(want['text_encoder'])
  return ours


@pytest.fixture(scope='module')
def converted(built, tmp_path_factory):
  """name -> workdir: sd1 from the YAML and .safetensors (EMA), sd2 from the YAML and .ckpt,
  inpaint from --config and .ckpt; each equal to the diffusers-sd conversion."""
  out = {}
  for name, b in built.items():
    w = tmp_path_factory.mktemp(f'{name}_w') / 'w'
    if name == 'inpaint':
      parts = convert.convert('sd-single-file', b['ckpt'], w, config=b['folder'])
    else:
      src = b['st'] if name == 'sd1' else b['ckpt']
      tok = b['folder'] / 'tokenizer'
      parts = convert.convert('sd-single-file', src, w, original_config=b['yaml'], tokenizer=tok)
    assert parts.pipeline == SPECS[name]['pipeline']
    doc = _parts_equal_reference(w, b['ref'])
    assert ('model_ema' in doc['source']) == (name == EMA_NAME), doc['source']
    out[name] = w
  return out


@pytest.mark.parametrize('name', list(SPECS))
def test_matches_diffusers(built, converted, name):
  b = built[name]
  test_sd.test_matches_diffusers({name: (b['folder'], converted[name], b['pipe'])}, name)


@pytest.mark.parametrize(
  'name,src,how', [('sd1', 'ckpt', 'config'), ('sd2', 'st', 'config'), ('inpaint', 'st', 'yaml')]
)
def test_other_forms_equal_the_reference(built, tmp_path, name, src, how):
  b = built[name]
  if how == 'config':
    options = {'config': b['folder']}
  else:
    options = {'original_config': b['yaml'], 'tokenizer': b['folder'] / 'tokenizer'}
  convert.convert('sd-single-file', b[src], tmp_path / 'w', **options)
  _parts_equal_reference(tmp_path / 'w', b['ref'])


def test_ema_is_preferred_and_no_ema_takes_the_raw_weights(built):
  b = built[EMA_NAME]
  tok = b['folder'] / 'tokenizer'
  read = lambda **kw: sd_single_file.convert_sd_single_file(
    b['st'], original_config=b['yaml'], tokenizer=tok, **kw
  )
  ema, raw = read(), read(no_ema=True)
  assert 'EMA weights model_ema.*' in ema.source and 'raw weights' in raw.source
  key = 'input_blocks.1.0.in_layers.2.weight'  # down_blocks.0.resnets.0.conv1
  got = {
    n: unet_lib.flat_params(p.unet[1])['down_blocks.0.resnets.0.conv1.kernel']
    for n, p in (('ema', ema), ('raw', raw))
  }
  for copy, want in (
    ('ema', b['state'][f'model_ema.diffusion_model{key.replace(".", "")}']),
    ('raw', b['state'][f'model.diffusion_model.{key}']),
  ):
    np.testing.assert_array_equal(got[copy], want.numpy().transpose(2, 3, 1, 0))
  assert sd.flat_bytes(ema.vae[1]) == sd.flat_bytes(raw.vae[1])


def _refused(b, state, tmp_path, *fragments, **options):
  path = _save(state, tmp_path / 'bad.safetensors')
  options = options or {'config': b['folder']}
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('sd-single-file', path, tmp_path / 'w', **options)
  text = str(e.value)
  assert '\n' not in text and str(path) in text, text
  for f in fragments:
    assert f in text, (f, text)
  assert not (tmp_path / 'w').exists()


def test_missing_unexpected_and_misshapen_keys_are_named(built, tmp_path):
  b = built['sd2']
  state = dict(b['state'])
  key = 'model.diffusion_model.output_blocks.5.2.conv.weight'  # the upsample after attention
  assert key in state
  del state[key]
  _refused(b, state, tmp_path, 'missing keys', key)

  state = dict(b['state'], **{'model.diffusion_model.extra.weight': torch.zeros(3)})
  _refused(b, state, tmp_path, 'unexpected keys', 'model.diffusion_model.extra.weight')
  state = dict(b['state'], **{'some_other_module.weight': torch.zeros(3)})
  _refused(b, state, tmp_path, 'unexpected key some_other_module.weight')

  key = 'first_stage_model.decoder.mid.attn_1.q.weight'
  state = dict(b['state'], **{key: torch.zeros(64, 64, 3, 3)})
  _refused(b, state, tmp_path, 'shape mismatch', key, '(64, 64, 3, 3)')
  key = 'cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight'
  state = dict(b['state'], **{key: torch.zeros(3 * 128 + 1, 128)})
  _refused(b, state, tmp_path, 'unexpected keys', key, 'missing keys', f'{key}:q')
  key = 'cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.bias'  # the dropped resblock
  state = {k: v for k, v in b['state'].items() if k != key}
  _refused(b, state, tmp_path, 'missing keys', key)


def test_ema_copy_must_match(built, tmp_path):
  b = built[EMA_NAME]
  key = 'model_ema.diffusion_modelout2weight'
  state = {k: v for k, v in b['state'].items() if k != key}
  options = {'config': b['folder']}
  _refused(b, state, tmp_path, 'missing keys', key, **options)
  sd1_raw = 'model.diffusion_model.out.2.weight'
  state = {k: v for k, v in b['state'].items() if k != sd1_raw}
  _refused(b, state, tmp_path, 'raw copy', sd1_raw, **options)


def test_configuration_errors(built, tmp_path):
  b = built['sd1']
  with pytest.raises(convert.ConversionError, match='--tokenizer'):
    convert.convert('sd-single-file', b['st'], tmp_path / 'w', original_config=b['yaml'])
  with pytest.raises(convert.ConversionError, match='exactly one of --original_config'):
    convert.convert('sd-single-file', b['st'], tmp_path / 'w')
  doc = original_yaml('sd1')
  doc['model']['params']['unet_config']['params']['use_scale_shift_norm'] = True
  (tmp_path / 'bad.yaml').write_text(yaml.safe_dump(doc))
  with pytest.raises(convert.ConversionError, match='use_scale_shift_norm=True'):
    convert.convert(
      'sd-single-file',
      b['st'],
      tmp_path / 'w',
      original_config=tmp_path / 'bad.yaml',
      tokenizer=b['folder'] / 'tokenizer',
    )
  with pytest.raises(convert.ConversionError, match='shape mismatch.*proj_in'):
    convert.convert('sd-single-file', built['sd2']['st'], tmp_path / 'w', config=b['folder'])
  with pytest.raises(convert.ConversionError, match='original_config apply to sd-single-file'):
    convert.convert('diffusers-sd', b['folder'], tmp_path / 'w', original_config=b['yaml'])
  assert not (tmp_path / 'w').exists()


def test_command_line(built, tmp_path):
  b = built['inpaint']
  cmd = [sys.executable, '-m', 'drc_jax.convert', '--format=sd-single-file', f'--src={b["ckpt"]}']
  opts = [f'--original_config={b["yaml"]}', f'--tokenizer={b["folder"] / "tokenizer"}']
  subprocess.run([*cmd, *opts, f'--workdir={tmp_path / "w"}'], check=True, capture_output=True)
  _parts_equal_reference(tmp_path / 'w', b['ref'])
  done = subprocess.run(
    [*cmd, opts[0], f'--workdir={tmp_path / "w2"}'], capture_output=True, text=True, check=False
  )
  assert done.returncode != 0 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert '--tokenizer' in done.stderr
