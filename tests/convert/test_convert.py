"""PyTorch checkpoint import: converted models compute what the PyTorch models compute.

References: diffusers ``UNet2DModel`` in the DDPM layout, and a PyTorch UNet written here from the
public description of pytorch-ddpm (same module names, so the same state-dict keys). Every weight
is perturbed away from its initial value so that a swapped or transposed tensor shows in the output.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch import needs the torch extra')

from drc_jax import convert, load_target
from drc_jax.targets import checkpoints

nn = torch.nn
TIMESTEPS = np.array([0, 17, 500, 999])
ATOL = 1e-4


# --------------------------------------------------------------------------- pytorch-ddpm reference


class _Attn(nn.Module):
  """Single-head self-attention with 1x1-conv projections and a residual (pytorch-ddpm names)."""

  def __init__(self, c):
    super().__init__()
    self.group_norm = nn.GroupNorm(32, c)
    self.proj_q, self.proj_k, self.proj_v, self.proj = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.group_norm(x)
    q, k, v = (p(y).reshape(b, c, h * w) for p in (self.proj_q, self.proj_k, self.proj_v))
    weights = torch.softmax(torch.einsum('bci,bcj->bij', q, k) / math.sqrt(c), dim=-1)
    return x + self.proj(torch.einsum('bij,bcj->bci', weights, v).reshape(b, c, h, w))


class _Res(nn.Module):
  """Norm-act-conv, + time projection, norm-act-dropout-conv, shortcut, optional attention."""

  def __init__(self, cin, cout, tdim, attn):
    super().__init__()
    self.block1 = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1))
    self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, cout))
    self.block2 = nn.Sequential(
      nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.1), nn.Conv2d(cout, cout, 3, 1, 1)
    )
    self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
    self.attn = _Attn(cout) if attn else nn.Identity()

  def forward(self, x, temb):
    h = self.block1(x) + self.temb_proj(temb)[:, :, None, None]
    return self.attn(self.block2(h) + self.shortcut(x))


class _Down(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.main = nn.Conv2d(c, c, 3, stride=2, padding=1)

  def forward(self, x, temb):
    del temb
    return self.main(x)


class _Up(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.main = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x, temb):
    del temb
    return self.main(nn.functional.interpolate(x, scale_factor=2, mode='nearest'))


class _TimeEmbedding(nn.Module):
  def __init__(self, num_steps, ch):
    super().__init__()
    half = ch // 2
    angles = (
      torch.arange(num_steps).float()[:, None]
      * torch.exp(-math.log(10000.0) * torch.arange(half).float() / half)[None, :]
    )
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_steps, ch)
    self.timembedding = nn.Sequential(
      nn.Embedding.from_pretrained(table),
      nn.Linear(ch, 4 * ch),
      nn.SiLU(),
      nn.Linear(4 * ch, 4 * ch),
    )

  def forward(self, t):
    return self.timembedding(t)


class DDPMReference(nn.Module):
  """The pytorch-ddpm UNet layout (head, downblocks, middleblocks, upblocks, tail)."""

  def __init__(self, ch, ch_mult, attn_levels, num_res_blocks, channels=3, num_steps=1000):
    super().__init__()
    tdim = 4 * ch
    self.time_embedding = _TimeEmbedding(num_steps, ch)
    self.head = nn.Conv2d(channels, ch, 3, 1, 1)
    skips, now = [ch], ch
    self.downblocks = nn.ModuleList()
    for i, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        self.downblocks.append(_Res(now, ch * mult, tdim, i in attn_levels))
        now = ch * mult
        skips.append(now)
      if i < len(ch_mult) - 1:
        self.downblocks.append(_Down(now))
        skips.append(now)
    self.middleblocks = nn.ModuleList([_Res(now, now, tdim, True), _Res(now, now, tdim, False)])
    self.upblocks = nn.ModuleList()
    for i in reversed(range(len(ch_mult))):
      for _ in range(num_res_blocks + 1):
        self.upblocks.append(_Res(skips.pop() + now, ch * ch_mult[i], tdim, i in attn_levels))
        now = ch * ch_mult[i]
      if i > 0:
        self.upblocks.append(_Up(now))
    self.tail = nn.Sequential(nn.GroupNorm(32, now), nn.SiLU(), nn.Conv2d(now, channels, 3, 1, 1))

  def forward(self, x, t):
    temb = self.time_embedding(t)
    h = self.head(x)
    hs = [h]
    for layer in self.downblocks:
      h = layer(h, temb)
      hs.append(h)
    for layer in self.middleblocks:
      h = layer(h, temb)
    for layer in self.upblocks:
      h = layer(torch.cat([h, hs.pop()], dim=1) if isinstance(layer, _Res) else h, temb)
    return self.tail(h)


# ----------------------------------------------------------------------------- helpers

DDPM_CONFIGS = {  # name: (ch, ch_mult, attention levels, num_res_blocks, channels, resolution)
  'paper': (128, (1, 2, 2, 2), (1,), 2, 3, 32),
  'small': (32, (1, 2, 2), (0,), 1, 1, 16),
}


def _perturb(module, seed, scale=0.03):
  """Adds noise to every parameter except the fixed time-embedding table."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if 'timembedding.0' not in name:
        p.add_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def _inputs(channels, resolution, seed=0):
  x = (
    np.random.default_rng(seed)
    .uniform(-1, 1, (len(TIMESTEPS), resolution, resolution, channels))
    .astype(np.float32)
  )
  return x, TIMESTEPS


def _torch_eps(model, x, t):
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t))
  out = out.sample if hasattr(out, 'sample') else out
  return out.permute(0, 2, 3, 1).numpy()


def _assert_same(target, reference, x, t):
  """``reference``: a torch model, or its output on (x, t)."""
  ours = np.asarray(target.apply(x, t))
  want = reference if isinstance(reference, np.ndarray) else _torch_eps(reference, x, t)
  assert np.abs(want).max() > 0.1  # a meaningful output, not all zeros
  np.testing.assert_allclose(ours, want, rtol=0, atol=ATOL)


def _ddpm_model(name, seed):
  ch, ch_mult, attn, nrb, channels, _ = DDPM_CONFIGS[name]
  torch.manual_seed(seed)
  return _perturb(DDPMReference(ch, ch_mult, attn, nrb, channels), seed)


@pytest.fixture(scope='module')
def ddpm_small():
  return _ddpm_model('small', 1)


@pytest.fixture
def small_pt(tmp_path, ddpm_small):
  """The small pytorch-ddpm model saved as a bare state dict (.pt)."""
  path = tmp_path / 'small.pt'
  torch.save(ddpm_small.state_dict(), path)
  return path


def _no_target(workdir):
  return not os.path.exists(workdir / 'model.json') and not os.path.exists(workdir / 'checkpoints')


# ----------------------------------------------------------------------------- pytorch-ddpm


@pytest.mark.parametrize('name', ['paper', 'small'])
def test_pytorch_ddpm_training_checkpoint(tmp_path, name):
  net, ema = _ddpm_model(name, 10), _ddpm_model(name, 20)
  ckpt = {
    'net_model': net.state_dict(),
    'ema_model': ema.state_dict(),
    'step': 1234,
    'sched': {'last_epoch': 1234, 'base_lrs': [2e-4]},
    'x_T': torch.randn(2, 3, 4, 4),
  }
  torch.save(ckpt, tmp_path / 'ckpt.pt')
  ch, ch_mult, attn, nrb, channels, res = DDPM_CONFIGS[name]
  x, t = _inputs(channels, res)

  convert.convert('pytorch-ddpm', tmp_path / 'ckpt.pt', tmp_path / 'ema', resolution=res)
  target = load_target(tmp_path / 'ema')
  cfg = target.config
  assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.in_channels, cfg.out_channels) == (
    ch,
    ch_mult,
    nrb,
    channels,
    channels,
  )
  assert cfg.attn_res == tuple(res // 2**i for i in attn)
  assert target.step == 1234 and target.schedule.num_timesteps == 1000
  _assert_same(target, ema, x, t)

  convert.convert(
    'pytorch-ddpm', tmp_path / 'ckpt.pt', tmp_path / 'net', weights='net', resolution=res
  )
  net_target = load_target(tmp_path / 'net')
  head = {
    'net': net.head.weight.detach().numpy().transpose(2, 3, 1, 0),
    'ema': ema.head.weight.detach().numpy().transpose(2, 3, 1, 0),
  }
  np.testing.assert_array_equal(np.asarray(net_target.params['head']['kernel']), head['net'])
  np.testing.assert_array_equal(np.asarray(target.params['head']['kernel']), head['ema'])
  if name == 'small':  # the paper model's net weights: parameters checked above, not outputs
    _assert_same(net_target, net, x, t)
  else:
    assert (
      35.6e6
      < sum(p.numel() for n, p in ema.named_parameters() if 'timembedding.0' not in n)
      < 35.8e6
    )


def test_pytorch_ddpm_bare_state_dict_and_safetensors(tmp_path, ddpm_small, small_pt):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  x, t = _inputs(1, 16)
  convert.convert('pytorch-ddpm', small_pt, tmp_path / 'pt', resolution=16)
  _assert_same(load_target(tmp_path / 'pt'), ddpm_small, x, t)
  safetensors.numpy.save_file(
    {k: v.numpy() for k, v in ddpm_small.state_dict().items()}, str(tmp_path / 'small.safetensors')
  )
  convert.convert('pytorch-ddpm', tmp_path / 'small.safetensors', tmp_path / 'st', resolution=16)
  _assert_same(load_target(tmp_path / 'st'), ddpm_small, x, t)


def test_command_line(tmp_path, ddpm_small):
  torch.save(
    {'net_model': ddpm_small.state_dict(), 'ema_model': _ddpm_model('small', 2).state_dict()},
    tmp_path / 'ckpt.pt',
  )
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo)
  subprocess.run(
    [
      sys.executable,
      '-m',
      'drc_jax.convert',
      '--format=pytorch-ddpm',
      f'--src={tmp_path / "ckpt.pt"}',
      f'--workdir={tmp_path / "w"}',
      '--weights=net',
      '--resolution=16',
      '--beta_end=0.03',
    ],
    check=True,
    env=env,
    cwd=repo,
  )
  doc = json.loads((tmp_path / 'w' / 'model.json').read_text())
  assert doc['diffusion'] == {
    'num_timesteps': 1000,
    'beta_schedule': 'linear',
    'beta_start': 1e-4,
    'beta_end': 0.03,
  }
  assert 'net_model' in doc['source']
  _assert_same(load_target(tmp_path / 'w'), ddpm_small, *_inputs(1, 16))


# ----------------------------------------------------------------------------- diffusers

DIFFUSERS_CONFIGS = {  # name: (ch, ch_mult, attention resolutions, layers, channels, size, groups)
  'paper': (128, (1, 2, 2, 2), (16,), 2, 3, 32, 32),
  'small': (32, (1, 2), (8,), 1, 1, 16, 8),
}


def _diffusers_model(name, seed):
  diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')
  ch, ch_mult, attn_res, layers, channels, size, groups = DIFFUSERS_CONFIGS[name]
  res = [size // 2**i for i in range(len(ch_mult))]
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(
    sample_size=size,
    in_channels=channels,
    out_channels=channels,
    layers_per_block=layers,
    block_out_channels=tuple(ch * m for m in ch_mult),
    down_block_types=tuple('AttnDownBlock2D' if r in attn_res else 'DownBlock2D' for r in res),
    up_block_types=tuple('AttnUpBlock2D' if r in attn_res else 'UpBlock2D' for r in reversed(res)),
    norm_num_groups=groups,
    norm_eps=1e-6,
    act_fn='silu',
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    time_embedding_type='positional',
    dropout=0.0,
  )
  return _perturb(model, seed)


@pytest.mark.parametrize('name', ['paper', 'small'])
def test_diffusers_matches_reference(tmp_path, name):
  model = _diffusers_model(name, 3)
  _, _, attn_res, _, channels, size, _ = DIFFUSERS_CONFIGS[name]
  x, t = _inputs(channels, size)
  model.save_pretrained(tmp_path / 'st', safe_serialization=True)
  assert os.path.exists(tmp_path / 'st' / 'diffusion_pytorch_model.safetensors')
  convert.convert('diffusers', tmp_path / 'st', tmp_path / 'w_st')
  target = load_target(tmp_path / 'w_st')
  assert target.config.attn_res == attn_res
  assert target.config.downsample_padding == 'asymmetric'
  want = _torch_eps(model, x, t)
  _assert_same(target, want, x, t)

  model.save_pretrained(tmp_path / 'bin', safe_serialization=False)
  assert os.path.exists(tmp_path / 'bin' / 'diffusion_pytorch_model.bin')
  convert.convert('diffusers', tmp_path / 'bin', tmp_path / 'w_bin')
  _assert_same(load_target(tmp_path / 'w_bin'), want, x, t)


def test_diffusers_deprecated_attention_names_and_scheduler(tmp_path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  model = _diffusers_model('small', 4)
  unet = tmp_path / 'pipe' / 'unet'
  model.save_pretrained(unet)
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  state = safetensors.numpy.load_file(str(unet / 'diffusion_pytorch_model.safetensors'))
  renamed = {}
  for k, v in state.items():
    for new, dep in old.items():
      k = k.replace(f'.{new}.', f'.{dep}.')
    renamed[k] = v
  assert any('.proj_attn.' in k for k in renamed)
  safetensors.numpy.save_file(renamed, str(unet / 'diffusion_pytorch_model.safetensors'))
  (tmp_path / 'pipe' / 'scheduler').mkdir()
  (tmp_path / 'pipe' / 'scheduler' / 'scheduler_config.json').write_text(
    json.dumps(
      {
        '_class_name': 'DDPMScheduler',
        'num_train_timesteps': 500,
        'beta_start': 1e-4,
        'beta_end': 0.02,
        'beta_schedule': 'linear',
      }
    )
  )
  converted = convert.convert('diffusers', tmp_path / 'pipe', tmp_path / 'w')
  assert converted.diffusion['num_timesteps'] == 500
  _assert_same(load_target(tmp_path / 'w'), model, *_inputs(1, 16))
  with pytest.raises(convert.ConversionError, match='num_timesteps=1000 contradicts'):
    convert.convert(
      'diffusers', tmp_path / 'pipe', tmp_path / 'w2', diffusion={'num_timesteps': 1000}
    )


GOOGLE_DDPM_CIFAR10 = {  # config.json of google/ddpm-cifar10-32 (fields it leaves out: defaults)
  '_class_name': 'UNet2DModel',
  'act_fn': 'silu',
  'attention_head_dim': None,
  'block_out_channels': [128, 256, 256, 256],
  'center_input_sample': False,
  'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
  'downsample_padding': 0,
  'flip_sin_to_cos': False,
  'freq_shift': 1,
  'in_channels': 3,
  'layers_per_block': 2,
  'mid_block_scale_factor': 1,
  'norm_eps': 1e-06,
  'norm_num_groups': 32,
  'out_channels': 3,
  'sample_size': 32,
  'time_embedding_type': 'positional',
  'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
}


def test_diffusers_config_of_the_paper_model():
  cfg = convert.diffusers_config(GOOGLE_DDPM_CIFAR10)
  assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.resolution) == (
    128,
    (1, 2, 2, 2),
    2,
    (16,),
    32,
  )
  assert (cfg.time_embed_layout, cfg.time_freq_shift, cfg.downsample_padding, cfg.norm_eps) == (
    'sin_cos',
    1,
    'asymmetric',
    1e-6,
  )


@pytest.mark.parametrize(
  'field,value',
  [
    ('resnet_time_scale_shift', 'scale_shift'),
    ('attention_head_dim', 96),
    ('time_embedding_type', 'fourier'),
    ('center_input_sample', True),
    ('add_attention', False),
    ('class_embed_type', 'timestep'),
    ('num_class_embeds', 10),
    ('mid_block_scale_factor', 2),
    ('act_fn', 'gelu'),
    ('downsample_type', 'resnet'),
    ('attn_norm_num_groups', 8),
    ('up_block_types', ['UpBlock2D'] * 4),
    ('block_out_channels', [128, 192, 256, 256]),
    ('some_new_field', 1),
  ],
)
def test_diffusers_config_refused(field, value):
  with pytest.raises(convert.ConversionError, match=field):
    convert.diffusers_config(dict(GOOGLE_DDPM_CIFAR10, **{field: value}))


# ----------------------------------------------------------------------------- errors


def _edit_and_convert(tmp_path, ddpm_small, edit):
  state = dict(ddpm_small.state_dict())
  edit(state)
  torch.save(state, tmp_path / 'bad.pt')
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('pytorch-ddpm', tmp_path / 'bad.pt', tmp_path / 'w', resolution=16)
  assert _no_target(tmp_path / 'w')
  return str(e.value)


def test_missing_key(tmp_path, ddpm_small):
  msg = _edit_and_convert(tmp_path, ddpm_small, lambda s: s.pop('upblocks.1.block2.3.weight'))
  assert 'missing keys upblocks.1.block2.3.weight' in msg


def test_unexpected_key(tmp_path, ddpm_small):
  def edit(s):
    s['upblocks.0.extra.weight'] = torch.zeros(3)

  assert 'unexpected keys upblocks.0.extra.weight' in _edit_and_convert(tmp_path, ddpm_small, edit)


def test_wrong_shape(tmp_path, ddpm_small):
  def edit(s):
    s['middleblocks.0.attn.proj_q.weight'] = torch.zeros(64, 64)

  msg = _edit_and_convert(tmp_path, ddpm_small, edit)
  assert 'middleblocks.0.attn.proj_q.weight: checkpoint (64, 64) vs expected (64, 64, 1, 1)' in msg


def test_non_finite_weight(tmp_path, ddpm_small):
  def edit(s):
    s['downblocks.0.block1.2.weight'] = s['downblocks.0.block1.2.weight'].clone()
    s['downblocks.0.block1.2.weight'][0, 0, 0, 0] = float('nan')

  assert 'non-finite' in _edit_and_convert(tmp_path, ddpm_small, edit)
  assert 'downblocks.0.block1.2.weight' in _edit_and_convert(tmp_path, ddpm_small, edit)


def test_wrong_time_table(tmp_path, ddpm_small):
  def edit(s):
    s['time_embedding.timembedding.0.weight'] = s['time_embedding.timembedding.0.weight'].flip(1)

  assert 'time_embedding.timembedding.0.weight' in _edit_and_convert(tmp_path, ddpm_small, edit)


def test_unsupported_extension(tmp_path, small_pt):
  os.rename(small_pt, tmp_path / 'model.pkl')
  with pytest.raises(convert.ConversionError, match='model.pkl: unsupported checkpoint extension'):
    convert.convert('pytorch-ddpm', tmp_path / 'model.pkl', tmp_path / 'w')
  assert _no_target(tmp_path / 'w')


class _NotATensor:
  pass


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch ran',))


def test_unsafe_pickle_refused(tmp_path, ddpm_small):
  torch.save({'ema_model': ddpm_small.state_dict(), 'extra': _NotATensor()}, tmp_path / 'x.pt')
  with pytest.raises(convert.ConversionError, match=r'x.pt: refused: it pickles .*_NotATensor'):
    convert.convert('pytorch-ddpm', tmp_path / 'x.pt', tmp_path / 'w')


def test_refusals_say_what_and_never_suggest_disabling_the_safety(tmp_path):
  torch.save({'a': _RunsCode()}, tmp_path / 'evil.pt')
  (tmp_path / 'cut.pt').write_bytes((tmp_path / 'evil.pt').read_bytes()[:40])
  for name, what in (('evil.pt', r'refused: it pickles (posix|os)\.system'), ('cut.pt', 'not a')):
    with pytest.raises(convert.ConversionError) as e:
      convert.read_checkpoint(tmp_path / name)
    message = str(e.value)
    assert re.search(f'{name}: {what}', message), message
    assert 'weights_only=False' not in message and 're-running' not in message.lower(), message
    assert '\n' not in message
  assert not (tmp_path / 'ran').exists()


def test_missing_torch_is_a_clear_error(tmp_path, small_pt, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(convert.ConversionError, match="install the 'torch' extra"):
    convert.read_checkpoint(small_pt)


def test_no_ema_model(tmp_path, ddpm_small):
  torch.save({'net_model': ddpm_small.state_dict()}, tmp_path / 'ckpt.pt')
  with pytest.raises(convert.ConversionError, match="no 'ema_model'"):
    convert.convert('pytorch-ddpm', tmp_path / 'ckpt.pt', tmp_path / 'w')


def test_existing_workdir_refused(tmp_path, small_pt):
  convert.convert('pytorch-ddpm', small_pt, tmp_path / 'w', resolution=16)
  with pytest.raises(convert.ConversionError, match='fresh workdir'):
    convert.convert('pytorch-ddpm', small_pt, tmp_path / 'w', resolution=16)


# ----------------------------------------------------------------------------- load_target


def test_load_target_paths(tmp_path, ddpm_small, small_pt):
  convert.convert('pytorch-ddpm', small_pt, tmp_path / 'w', resolution=16)
  x, t = _inputs(1, 16)
  whole = load_target(tmp_path / 'w')
  want = np.asarray(whole.apply(x, t))
  for path in (tmp_path / 'w' / 'checkpoints', tmp_path / 'w' / 'checkpoints' / '0'):
    np.testing.assert_array_equal(np.asarray(load_target(path).apply(x, t)), want)
  np.testing.assert_allclose(
    np.asarray(jax.jit(whole.model.apply)(whole.params, x, t)), want, rtol=0, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(whole.apply(x, 17)),
    _torch_eps(ddpm_small, x, np.full(len(x), 17)),
    rtol=0,
    atol=ATOL,
  )
  assert whole.schedule.num_timesteps == 1000 and whole.params is not None
  for bad in (tmp_path, tmp_path / 'w' / 'checkpoints' / '7', tmp_path / 'nope'):
    with pytest.raises(checkpoints.CheckpointError):
      load_target(bad)
  with pytest.raises(TypeError, match='integer'):
    whole.apply(x, t.astype(np.float32))


def test_imported_target_is_audited_not_trained(tmp_path, small_pt):
  """--mode=all on a converted workdir audits the imported target; --mode=train is refused."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top

  from drc_jax.audit import modes as pipeline  # pylint: disable=g-import-not-at-top

  convert.convert('pytorch-ddpm', small_pt, tmp_path / 'w', resolution=16)
  c = load_config('fashion_mnist', 'runlocal')
  c.split.num_members = c.split.num_nonmembers = 16
  c.attacks.names = 'loss,pia'
  metrics = pipeline.run(c, str(tmp_path / 'w'), 'all')
  assert (
    set(metrics) == {'loss', 'pia', 'blind'} and metrics['loss']['all_images']['n_members'] == 16
  )
  assert not (tmp_path / 'w' / 'checkpoints' / '20').exists()  # nothing was trained
  with pytest.raises(checkpoints.CheckpointError, match='imported target'):
    pipeline.run(c, str(tmp_path / 'w'), 'train')
