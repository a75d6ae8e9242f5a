"""Stable Diffusion targets: a diffusers StableDiffusion(Inpaint)Pipeline converts, loads with
``drc_jax.load_target`` and computes what diffusers and transformers compute.

Two tiny pipelines are built offline, every tensor random (GroupNorm and LayerNorm scales and
shifts included, so a swapped or transposed tensor shows), saved with ``save_pretrained`` and
converted with ``--format=diffusers-sd``:

* ``sd2``: a ``StableDiffusionPipeline`` in SD 2.x's style: linear projections, heads per block,
  upcast attention, a GELU text tower, ``!`` padding, a ``DDIMScheduler`` with ``v_prediction``
  and ``scaled_linear`` betas;
* ``inpaint``: a ``StableDiffusionInpaintPipeline`` in SD 1.x's style: a 9-channel UNet with
  1x1-conv projections, a quick_gelu text tower, ``<|endoftext|>`` padding, a ``PNDMScheduler``
  with epsilon prediction; UNet and text encoder weights sharded.

transformers 5.x saves a tokenizer as ``tokenizer.json`` only; the pipelines get the hand-written
``vocab.json``/``merges.txt`` folder the SD repositories ship (``tests/models/sd_fixtures.py``).
``tokenize`` must equal transformers' ids exactly; ``encode_text`` (after ``tokenize``: diffusers'
``encode_prompt``), ``apply``, ``encode`` and ``decode`` must match within 1e-4 of
max(1, max |value|).
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='diffusers import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')
transformers = pytest.importorskip('transformers', reason='the text tower needs transformers')

from drc_jax import convert, load_target  # noqa: E402
from drc_jax.convert import diffusers_sd  # noqa: E402
from drc_jax.targets import checkpoints, sd  # noqa: E402
from drc_jax.targets import load as load_lib  # noqa: E402

_spec = importlib.util.spec_from_file_location(
  'sd_fixtures', os.path.join(os.path.dirname(__file__), '..', 'models', 'sd_fixtures.py')
)
sd_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd_fixtures)

TOL = 1e-4
TEXTS = [
  'a photo of an astronaut riding a horse on the moon',
  'The CAT sat!! on the mat.',
  '',
  ' '.join(['a painting of a cat'] * 30),  # > 77 tokens: truncated
]

SPECS = {
  'sd2': dict(
    pipeline='StableDiffusionPipeline',
    pad='!',
    unet=dict(
      sample_size=8,
      in_channels=4,
      out_channels=4,
      block_out_channels=(32, 64),
      layers_per_block=1,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      cross_attention_dim=32,
      attention_head_dim=(2, 4),
      use_linear_projection=True,
      upcast_attention=True,
      norm_num_groups=8,
    ),
    text=dict(hidden_act='gelu', hidden_size=32, num_attention_heads=4),
    scheduler=('DDIMScheduler', 'v_prediction'),
    sharded=False,
  ),
  'inpaint': dict(
    pipeline='StableDiffusionInpaintPipeline',
    pad='<|endoftext|>',
    unet=dict(
      sample_size=8,
      in_channels=9,
      out_channels=4,
      block_out_channels=(32, 64),
      layers_per_block=1,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      cross_attention_dim=24,
      attention_head_dim=4,
      norm_num_groups=8,
    ),
    text=dict(hidden_act='quick_gelu', hidden_size=24, num_attention_heads=3),
    scheduler=('PNDMScheduler', 'epsilon'),
    sharded=True,
  ),
}
VAE = dict(
  block_out_channels=(16, 32),
  down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D'),
  up_block_types=('UpDecoderBlock2D', 'UpDecoderBlock2D'),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  sample_size=16,
)


def _perturb(model, seed, scale=0.1):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def _pipeline(spec, folder, seed):
  """A random pipeline of ``spec``, saved to ``folder`` with the hand-written tokenizer."""
  tok_dir = sd_fixtures.write_tokenizer(folder.parent / f'{folder.name}_tok', spec['pad'])
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
  torch.manual_seed(seed)
  text_cfg = transformers.CLIPTextConfig(
    vocab_size=580,  # the test vocabulary's 574 tokens fit
    intermediate_size=37,
    num_hidden_layers=2,
    max_position_embeddings=77,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    **spec['text'],
  )
  text_encoder = _perturb(transformers.CLIPTextModel(text_cfg), seed)
  unet = _perturb(diffusers.UNet2DConditionModel(**spec['unet']), seed + 1)
  vae = _perturb(diffusers.AutoencoderKL(**VAE), seed + 2)
  name, prediction = spec['scheduler']
  scheduler = getattr(diffusers, name)(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule='scaled_linear',
    prediction_type=prediction,
    steps_offset=1,
    set_alpha_to_one=False,
    **({'clip_sample': False} if name == 'DDIMScheduler' else {'skip_prk_steps': True}),
  )
  pipe = getattr(diffusers, spec['pipeline'])(
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=tokenizer,
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(str(folder))
  shutil.rmtree(folder / 'tokenizer')  # transformers 5.x wrote tokenizer.json only
  shutil.copytree(tok_dir, folder / 'tokenizer')
  if spec['sharded']:
    for part, model, size in (('unet', unet, '100KB'), ('text_encoder', text_encoder, '20KB')):
      shutil.rmtree(folder / part)
      model.save_pretrained(str(folder / part), max_shard_size=size)
      assert any(p.name.endswith('.index.json') for p in (folder / part).iterdir())
  return pipe


def _err(ours, want):
  """max |ours - want| / max(1, max |want|)."""
  ours, want = np.asarray(ours), np.asarray(want)
  assert ours.shape == want.shape, (ours.shape, want.shape)
  assert np.abs(want).max() > 0.05
  return float(np.abs(ours - want).max() / max(1.0, np.abs(want).max()))


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """name -> (pipeline folder, workdir, diffusers pipeline), each converted once."""
  out = {}
  for i, (name, spec) in enumerate(SPECS.items()):
    root = tmp_path_factory.mktemp(name)
    pipe = _pipeline(spec, root / 'pipe', seed=20 + 10 * i)
    parts = convert.convert('diffusers-sd', root / 'pipe', root / 'w')
    assert isinstance(parts, sd.SDParts) and parts.pipeline == spec['pipeline']
    out[name] = (root / 'pipe', root / 'w', pipe)
  return out


@pytest.mark.parametrize('name', list(SPECS))
def test_matches_diffusers(built, name):
  folder, workdir, pipe = built[name]
  spec = SPECS[name]
  target = load_target(workdir)
  assert isinstance(target, sd.SDTarget)
  assert target.in_channels == spec['unet']['in_channels']
  assert target.is_inpainting == (name == 'inpaint')
  assert target.prediction_type == spec['scheduler'][1]
  assert target.scaling_factor == pipe.vae.config.scaling_factor == 0.18215
  assert target.path == str(workdir) and target.step == 0
  np.testing.assert_allclose(
    target.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double().numpy(), rtol=1e-6
  )

  ids = target.tokenize(TEXTS)
  want_ids = pipe.tokenizer(TEXTS, padding='max_length', max_length=77, truncation=True).input_ids
  assert ids.dtype == np.int32 and np.array_equal(ids, np.array(want_ids))
  with torch.no_grad():
    want_ctx = pipe.encode_prompt(TEXTS, 'cpu', 1, False)[0].numpy()
  ctx = target.encode_text(ids)
  errs = {'encode_text': _err(ctx, want_ctx)}

  rng = np.random.default_rng(1)
  b, r = len(TEXTS), spec['unet']['sample_size']
  z = rng.normal(0, 1, (b, r, r, target.in_channels)).astype(np.float32)
  t = np.array([0, 421, 999, 37])
  with torch.no_grad():
    want = pipe.unet(_nchw(z), torch.from_numpy(t), torch.from_numpy(want_ctx)).sample
  errs['apply'] = _err(target.apply(z, t, want_ctx), _nhwc(want))
  pure = target.apply_fn(target.params, z, t, want_ctx)  # the pure function, unjitted
  errs['apply_fn'] = _err(pure, _nhwc(want))

  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  lat = rng.normal(0, 1, (2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want_mean = _nhwc(pipe.vae.encode(_nchw(x)).latent_dist.mean)
    want_x = _nhwc(pipe.vae.decode(_nchw(lat)).sample)
  errs['encode'] = _err(target.encode(x), want_mean)
  errs['decode'] = _err(target.decode(lat), want_x)
  print(name, errs)  # pytest -s shows the numbers
  assert max(errs.values()) <= TOL, errs


def test_workdir_files_and_hashes(built):
  _, workdir, _ = built['sd2']
  doc = json.loads((workdir / checkpoints.MODEL_JSON).read_text())
  assert doc['format'] == sd.FORMAT and doc['kind'] == 'stable_diffusion'
  assert doc['diffusion'] == {
    'num_timesteps': 1000,
    'beta_schedule': 'scaled_linear',
    'beta_start': 0.00085,
    'beta_end': 0.012,
  }
  files = load_lib.target_files(workdir)
  names = sorted(str(p.relative_to(workdir)) for p in files)
  assert names == sorted(
    [
      'model.json',
      'text_encoder.safetensors',
      'unet.safetensors',
      'vae.safetensors',
      'tokenizer/merges.txt',
      'tokenizer/special_tokens_map.json',
      'tokenizer/tokenizer_config.json',
      'tokenizer/vocab.json',
    ]
  )
  for name, want in doc['sha256'].items():
    assert hashlib.sha256((workdir / name).read_bytes()).hexdigest() == want


def _one_line_error(exc_info, *fragments):
  text = str(exc_info.value)
  assert '\n' not in text, text
  for f in fragments:
    assert f in text, (f, text)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize('part', ['unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'])
def test_missing_part_is_named(built, tmp_path, part):
  pipe = _copy(built['sd2'][0], tmp_path / 'pipe')
  shutil.rmtree(pipe / part)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('diffusers-sd', pipe, tmp_path / 'w')
  _one_line_error(e, str(pipe / part), 'missing')
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize(
  'field,value',
  [
    ('prediction_type', 'sample'),
    ('beta_schedule', 'exponential'),
    ('rescale_betas_zero_snr', True),
    ('trained_betas', [0.1, 0.2]),
    ('_class_name', 'FlowMatchEulerDiscreteScheduler'),
    ('num_train_timesteps', 'many'),
  ],
)
def test_unsupported_scheduler_field_is_named(built, tmp_path, field, value):
  pipe = _copy(built['sd2'][0], tmp_path / 'pipe')
  path = pipe / 'scheduler' / 'scheduler_config.json'
  doc = json.loads(path.read_text())
  doc[field] = value
  path.write_text(json.dumps(doc))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('diffusers-sd', pipe, tmp_path / 'w')
  _one_line_error(e, 'scheduler_config.json', field)
  assert not (tmp_path / 'w').exists()


def test_mismatched_parts_and_options(built, tmp_path):
  pipe = _copy(built['sd2'][0], tmp_path / 'pipe')
  (pipe / 'tokenizer' / 'vocab.json').unlink()
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('diffusers-sd', pipe, tmp_path / 'w')
  _one_line_error(e, 'vocab.json: not found')
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('diffusers-sd', built['sd2'][0], tmp_path / 'w', resolution=64)
  _one_line_error(e, 'resolution')
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('diffusers-sd', built['sd2'][0], tmp_path / 'w', diffusion={'beta_end': 0.02})
  _one_line_error(e, '--beta_end=0.02 contradicts', 'scheduler_config.json')
  pipe = _copy(built['sd2'][0], tmp_path / 'pipe2')
  index = json.loads((pipe / 'model_index.json').read_text())
  (pipe / 'model_index.json').write_text(json.dumps(dict(index, _class_name='FluxPipeline')))
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('diffusers-sd', pipe, tmp_path / 'w')
  _one_line_error(e, 'model_index.json', 'FluxPipeline')
  assert not (tmp_path / 'w').exists()
  with pytest.raises(convert.ConversionError) as e:  # the workdir already holds a target
    convert.convert('diffusers-sd', built['sd2'][0], built['sd2'][1])
  _one_line_error(e, 'model.json exists')


def test_damaged_weights_are_refused_on_load(built, tmp_path):
  workdir = _copy(built['sd2'][1], tmp_path / 'w')
  path = workdir / 'unet.safetensors'
  data = bytearray(path.read_bytes())
  data[-3] ^= 0x10
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoints.CheckpointError) as e:
    load_target(workdir)
  _one_line_error(e, str(path), 'SHA-256', 'changed or corrupted')
  path.unlink()
  with pytest.raises(checkpoints.CheckpointError) as e:
    load_target(workdir)
  _one_line_error(e, str(path), 'missing')


def test_repo_id_from_the_local_hub_cache(built, tmp_path, monkeypatch):
  hub = pytest.importorskip('huggingface_hub')
  cache = tmp_path / 'hub'
  repo = cache / 'models--drc--tiny-sd'
  commit = 'a' * 40
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  shutil.copytree(built['sd2'][0], repo / 'snapshots' / commit)
  monkeypatch.setattr(hub.constants, 'HF_HUB_CACHE', str(cache))
  assert diffusers_sd.resolve_src('drc/tiny-sd') == repo / 'snapshots' / commit
  with pytest.raises(convert.ConversionError) as e:
    diffusers_sd.resolve_src('drc/not-cached')
  _one_line_error(e, 'drc/not-cached', 'local Hugging Face cache', 'never downloads')


def test_command_line(built, tmp_path):
  folder, workdir, _ = built['sd2']
  cmd = [sys.executable, '-m', 'drc_jax.convert', '--format=diffusers-sd', f'--src={folder}']
  subprocess.run([*cmd, f'--workdir={tmp_path / "w"}'], check=True, capture_output=True)
  ours = json.loads((tmp_path / 'w' / checkpoints.MODEL_JSON).read_text())
  assert ours == json.loads((workdir / checkpoints.MODEL_JSON).read_text())
  done = subprocess.run(
    [*cmd, f'--workdir={tmp_path / "w"}'], capture_output=True, text=True, check=False
  )
  assert done.returncode != 0
  lines = [ln for ln in done.stderr.splitlines() if 'model.json exists' in ln]
  assert len(lines) == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
