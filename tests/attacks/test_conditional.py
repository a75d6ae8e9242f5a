"""Text-conditional attacks and restorations on tiny random Stable Diffusion targets.

Two pipelines of ``tests/convert/test_sd.py`` (``sd2``: v-prediction, DDIM; ``inpaint``: a 9-channel
UNet, epsilon) are built, converted and loaded once. Checked: every attack gives finite [B] scores,
the same for the same keys and for an image alone or in a batch; guidance scale 1 is one UNet call
and the conditional prediction; v -> epsilon and the DDIM step agree with diffusers' scheduler; the
inpainting UNet's 9-channel input equals the one diffusers' own helpers build; CLiD on a stub whose
errors are known by hand.
"""

import importlib.util
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='diffusers import needs the torch extra')
diffusers = pytest.importorskip('diffusers', reason='diffusers import needs the torch extra')
transformers = pytest.importorskip('transformers', reason='the text tower needs transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from drc_jax import convert  # noqa: E402
from drc_jax.attacks import conditional as attacks_lib  # noqa: E402
from drc_jax.core import config_base  # noqa: E402
from drc_jax.drc import conditional as cond_lib  # noqa: E402
from drc_jax.drc import scorer as drc_lib  # noqa: E402
from drc_jax.targets import checkpoints, sd  # noqa: E402

_spec = importlib.util.spec_from_file_location(
  'test_sd_shared', os.path.join(os.path.dirname(__file__), '..', 'convert', 'test_sd.py')
)
test_sd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_sd)

CAPTIONS = ['a photo of a cat', 'an astronaut riding a horse', 'the moon']
SIZE = 16  # image side: the test VAE downsamples by 2, the UNet's latents are 8 x 8


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """name -> (SDTarget (eager), diffusers pipeline)."""
  out = {}
  for i, name in enumerate(('sd2', 'inpaint')):
    root = tmp_path_factory.mktemp(f'cond_{name}')
    pipe = test_sd._pipeline(test_sd.SPECS[name], root / 'pipe', seed=20 + 10 * i)
    convert.convert('diffusers-sd', root / 'pipe', root / 'w')
    out[name] = (sd.load(root / 'w'), pipe)
  return out


@pytest.fixture(scope='module')
def batch(built):
  target = built['sd2'][0]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (3, SIZE, SIZE, 3)), jnp.float32)
  ctx = target.encode_text(target.tokenize(CAPTIONS))
  degraded = [attacks_lib.degraded_captions(c) for c in CAPTIONS]  # 3 per caption
  deg_ids = target.tokenize([d for ds in degraded for d in ds])
  deg = target.encode_text(deg_ids).reshape(3, 3, *ctx.shape[1:])
  keys = jnp.asarray(drc_lib.image_keys(0, 3, np.arange(3)))
  return images, ctx, deg, keys


def _config():
  return config_base.base_config()


@pytest.mark.parametrize('name', ['loss', 'secmi', 'pia', 'pian', 'sima', 'clid'])
def test_attack_scores_finite_deterministic_and_per_image(built, batch, name):
  target = built['sd2'][0]
  images, ctx, deg, keys = batch
  null = cond_lib.empty_context(target)
  att = attacks_lib.make_conditional_attacks(_config(), target, [name], null)[name]
  side = {'context': ctx, 'clid_contexts': deg}
  s = np.asarray(att.scores(target.params, keys, images, att.aux, side))
  assert s.shape == (3,) and np.all(np.isfinite(s))
  again = np.asarray(att.scores(target.params, keys, images, att.aux, side))
  np.testing.assert_array_equal(s, again)
  one_side = {k: v[1:2] for k, v in side.items()}
  alone = np.asarray(att.scores(target.params, keys[1:2], images[1:2], att.aux, one_side))
  np.testing.assert_allclose(alone[0], s[1], rtol=1e-4, atol=1e-5 * max(1.0, abs(s[1])))
  assert len(set(np.round(s, 6))) == 3  # the images differ


def test_guidance_scale_one_is_one_call_and_the_conditional_prediction(built, batch):
  target = built['sd2'][0]
  images, ctx, _, _ = batch
  calls = []

  def counting(params, z, t, context):
    calls.append(context)
    return target.apply_fn(params, z, t, context)

  z = cond_lib.latents(target, target.params, images)
  t = jnp.full((3,), 300, jnp.int32)
  null = cond_lib.empty_context(target)
  den = cond_lib.Denoiser(counting, target.schedule, target.prediction_type, 1.0)
  got = den.eps(target.params, z, t, ctx, null)
  assert len(calls) == 1 and den.calls == 1
  v = target.apply_fn(target.params, z, t, ctx)
  a = float(target.schedule.abar(300))
  np.testing.assert_allclose(got, math.sqrt(a) * v + math.sqrt(1 - a) * z, rtol=1e-5, atol=1e-5)

  calls.clear()
  guided = cond_lib.Denoiser(counting, target.schedule, target.prediction_type, 3.0)
  out = guided.output(target.params, z, t, ctx, null)
  assert len(calls) == 2 and guided.calls == 2
  u = target.apply_fn(target.params, z, t, jnp.broadcast_to(null, ctx.shape))
  np.testing.assert_allclose(out, u + 3.0 * (v - u), rtol=1e-5, atol=1e-5)

  # Per step of an attack: SecMI's 11 steps trace 11 UNet calls at s = 1, 22 at s = 3.
  for d, want in ((den, 11), (guided, 22)):
    calls.clear()
    fn = attacks_lib.secmi_scores(d, 100, 10)
    jax.eval_shape(lambda p, z, fn=fn: fn(p, None, z, ctx, null), target.params, z)
    assert len(calls) == want


def test_v_to_eps_and_ddim_step_match_diffusers(built):
  target, pipe = built['sd2']
  assert target.prediction_type == 'v_prediction'
  sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  gen = torch.Generator().manual_seed(1)
  x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
  t = torch.tensor([37, 640])
  z_t, v = sched.add_noise(x0, noise, t), sched.get_velocity(x0, noise, t)
  nhwc = lambda a: jnp.asarray(a.permute(0, 2, 3, 1).numpy())
  eps = cond_lib.to_eps(nhwc(v), nhwc(z_t), jnp.asarray(t.numpy()), target.schedule, 'v_prediction')
  np.testing.assert_allclose(eps, nhwc(noise), atol=1e-5)

  sched.set_timesteps(10)
  t_now = int(sched.timesteps[3])  # 601 (leading spacing, steps_offset 1): prev 501
  z, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
  want = sched.step(out, t_now, z, eta=0.0).prev_sample
  eps = cond_lib.to_eps(nhwc(out), nhwc(z), jnp.asarray([t_now]), target.schedule, 'v_prediction')
  got = target.schedule.ddim_step(nhwc(z), t_now, t_now - 100, eps)
  np.testing.assert_allclose(got, nhwc(want), atol=1e-5)


def _diffusers_inpaint_input(pipe, monkeypatch, images, fill, z_t):
  """The 9-channel input as ``StableDiffusionInpaintPipeline.__call__`` builds it (posterior mode
  for the masked image's latents)."""
  mod = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint
  orig = mod.retrieve_latents
  monkeypatch.setattr(
    mod, 'retrieve_latents', lambda out, generator=None: orig(out, generator, 'argmax')
  )
  init = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
  mask = pipe.mask_processor.preprocess(
    torch.from_numpy(np.asarray(fill)).permute(0, 3, 1, 2), height=SIZE, width=SIZE
  )
  masked_image = init * (mask < 0.5)
  with torch.no_grad():
    m, masked = pipe.prepare_mask_latents(
      mask, masked_image, init.shape[0], SIZE, SIZE, torch.float32, 'cpu', None, False
    )
  return torch.cat([z_t, m, masked], dim=1)


def test_inpaint_unet_input_and_ddim_step_match_diffusers(built, monkeypatch):
  target, pipe = built['inpaint']
  assert target.is_inpainting and target.in_channels == 9
  rng = np.random.default_rng(3)
  images = np.asarray(rng.uniform(-1, 1, (2, SIZE, SIZE, 3)), np.float32)
  fill = np.zeros((2, SIZE, SIZE, 1), np.float32)
  fill[0, 3:11, 5:14] = 0.7  # binarised to 1
  fill[1, 8:, :7] = 1.0
  fill[1, 0:3, 0:3] = 0.3  # binarised to 0
  z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
  want = _diffusers_inpaint_input(pipe, monkeypatch, images, fill, z_t)
  m, masked = cond_lib.inpaint_condition(target, target.params, jnp.asarray(images), fill)
  z_nhwc = jnp.asarray(z_t.permute(0, 2, 3, 1).numpy())
  got = cond_lib.inpaint_unet_input(z_nhwc, m, masked)
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)

  # One DDIM step: our UNet and step against diffusers' UNet and DDIMScheduler.step.
  sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
  sched.set_timesteps(10)
  t = int(sched.timesteps[2])
  ctx = target.encode_text(target.tokenize(CAPTIONS[:2]))
  with torch.no_grad():
    out = pipe.unet(want, t, encoder_hidden_states=torch.from_numpy(np.array(ctx))).sample
  prev = sched.step(out, t, z_t, eta=0.0).prev_sample.permute(0, 2, 3, 1).numpy()
  den = cond_lib.make_denoiser(target)
  ours = cond_lib.inpaint_step(den, target.params, z_nhwc, m, masked, t, t - 100, ctx)
  scale = max(1.0, float(np.abs(prev).max()))
  np.testing.assert_allclose(np.asarray(ours) / scale, prev / scale, atol=1e-4)


def _drc_cfg(restorer):
  c = _config().drc
  c.restorer, c.steps, c.jump_length, c.jump_n_sample = restorer, 3, 2, 2
  c.mask, c.mask_ratio, c.num_restorations = 'center_box', 0.5, 2
  return c


@pytest.mark.parametrize('name,restorer,scale', [('sd2', 'repaint', 1.0), ('inpaint', 'ddim', 2.0)])
def test_conditional_restorations(built, batch, name, restorer, scale):
  target = built[name][0]
  images, _, _, keys = batch
  ctx = target.encode_text(target.tokenize(CAPTIONS))
  null = cond_lib.empty_context(target)
  drc = cond_lib.make_conditional_drc(_drc_cfg(restorer), target, null, guidance_scale=scale)
  assert drc.restorer.name == ('unet_inpaint' if target.is_inpainting else 'repaint')
  # K = 2 restorations; DDIM: 3 steps x 2 calls (guided); RePaint: 3 steps with jumps, 1 call each
  assert drc.nfe == 2 * drc.restorer.nfe and drc.restorer.nfe == (6 if scale == 2.0 else 5)
  run = jax.jit(drc.similarities)  # one program: the batch and its permutation share it
  sims = np.asarray(run(target.params, keys, images, drc.aux, {'context': ctx}))
  assert sims.shape == (3, 2) and np.all(np.isfinite(sims))
  perm = np.array([2, 0, 1])
  moved = run(target.params, keys[perm], images[perm], drc.aux, {'context': ctx[perm]})
  np.testing.assert_allclose(moved, sims[perm], rtol=1e-4, atol=1e-5)
  shape = jax.eval_shape(drc.restored, target.params, keys, images, drc.aux, {'context': ctx})
  assert shape.shape == (3, 2, SIZE, SIZE, 3)


def test_clid_by_hand():
  """A stub whose error is known: z0 = 0, so z_t = sqrt(1 - abar_t) eps, and the stub predicts
  eps + w_t o(c) (o(c) = the context's first entry, w_t = t / 450): each condition's mean squared
  error is mean_t w_t^2 o(c)^2."""
  schedule = checkpoints.schedule_from(
    {
      'num_timesteps': 1000,
      'beta_schedule': 'scaled_linear',
      'beta_start': 8.5e-4,
      'beta_end': 0.012,
    }
  )

  def stub(params, z, t, context):
    del params
    a = schedule.abar(t)[:, None, None, None]
    w = (t.astype(jnp.float32) / 450.0)[:, None, None, None]
    return z / jnp.sqrt(1.0 - a) + w * context[:, 0, 0][:, None, None, None]

  den = cond_lib.Denoiser(stub, schedule, 'epsilon')
  ts = attacks_lib.clid_timesteps()
  assert ts == [440, 450, 460] and attacks_lib.clid_timesteps(450, 10, 4) == [430, 440, 450, 460]
  m = np.mean([(t / 450.0) ** 2 for t in ts])
  ctx = lambda v: jnp.full((2, 4, 3), 0.0).at[:, 0, 0].set(jnp.asarray(v, jnp.float32))
  own, deg1, deg2, null = (
    [1.0, 0.5],
    [2.0, 0.5],
    [3.0, 1.5],
    jnp.full((1, 4, 3), 0.0).at[0, 0, 0].set(4.0),
  )
  degraded = jnp.stack([ctx(deg1), ctx(deg2)], axis=1)  # [B, M=2, L, D]
  keys = jnp.asarray(drc_lib.image_keys(0, 11, np.arange(2)))
  f = attacks_lib.clid_features(den, ts)(
    None, keys, jnp.zeros((2, 4, 4, 4)), ctx(own), degraded, null
  )
  o, d1, d2 = np.square(own), np.square(deg1), np.square(deg2)
  want = np.stack([o, d1 - o, d2 - o, 16.0 - o], axis=1) * m
  np.testing.assert_allclose(f, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(attacks_lib.clid_th(f), want[:, 1:].mean(axis=1), rtol=1e-4)
  th = attacks_lib.clid_th(f, 0.3, center=(0.1, -0.2), scale=(2.0, 0.5))
  expect = -(0.7 * (want[:, 0] - 0.1) / 2.0 + 0.3 * (-want[:, 1:].mean(axis=1) + 0.2) / 0.5)
  np.testing.assert_allclose(th, expect, rtol=1e-4)


def test_degraded_captions():
  assert attacks_lib.degraded_captions('abcdefghi') == ['abc', 'def', 'ghi']
  cut = attacks_lib.degraded_captions('a red cat sat', [0.1, 0.9, 0.8, 0.2], (0.3, 0.5, 0.7))
  e = attacks_lib.CLID_MASK_TOKEN
  assert cut == [f'a {e} {e} sat', f'a {e} {e} sat', f'a {e} {e} {e}']  # int(r n - 0.01)-th
  with pytest.raises(ValueError, match='importance'):
    attacks_lib.degraded_captions('a b', [1.0])


def test_unknown_attack_and_missing_context_are_named(built):
  target = built['sd2'][0]
  with pytest.raises(ValueError, match='config.attacks.names'):
    attacks_lib.make_conditional_attacks(_config(), target, ['pfami'], None)
  att = attacks_lib.make_conditional_attacks(_config(), target, ['sima'], None)['sima']
  with pytest.raises(ValueError, match="side\\['context'\\]"):
    att.scores(target.params, jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1, SIZE, SIZE, 3)))
