"""Beta schedules against diffusers' schedulers (pinned 0.42.1): ``linear``, ``scaled_linear``
(latent diffusion) and ``cosine`` (diffusers ``squaredcos_cap_v2``), each within 1e-6, built
directly, from a config section, and from a diffusers ``scheduler_config.json`` through the
converter and ``model.json``'s reader."""

import json

import ml_collections
import numpy as np
import pytest

diffusers = pytest.importorskip('diffusers', reason='diffusers comparison needs the torch extra')

from drc_jax.convert import ConversionError  # noqa: E402
from drc_jax.convert import common as common_lib  # noqa: E402
from drc_jax.convert import diffusers as diffusers_lib  # noqa: E402
from drc_jax.core import schedule as S  # noqa: E402
from drc_jax.targets import checkpoints  # noqa: E402

TOL = 1e-6
# (diffusers beta_schedule, ours, T, beta_start, beta_end): the CompVis LDM schedule
# (ffhq-ldm-vq-4: linear_start 0.0015, linear_end 0.0195, 1000 steps), Stable Diffusion's, DDPM's.
CASES = [
  ('scaled_linear', 'scaled_linear', 1000, 0.0015, 0.0195),
  ('scaled_linear', 'scaled_linear', 1000, 0.00085, 0.012),
  ('scaled_linear', 'scaled_linear', 37, 0.001, 0.03),
  ('linear', 'linear', 1000, 1e-4, 0.02),
  ('squaredcos_cap_v2', 'cosine', 1000, 1e-4, 0.02),
  ('squaredcos_cap_v2', 'cosine', 50, 1e-4, 0.02),
]


def _reference(cls, theirs, T, start, end):
  sched = getattr(diffusers, cls)(
    num_train_timesteps=T, beta_schedule=theirs, beta_start=start, beta_end=end
  )
  return sched, sched.betas.double().numpy()


@pytest.mark.parametrize('cls', ['DDPMScheduler', 'DDIMScheduler'])
@pytest.mark.parametrize('theirs,ours,T,start,end', CASES)
def test_betas_match_diffusers(cls, theirs, ours, T, start, end):
  _, want = _reference(cls, theirs, T, start, end)
  kw = {'beta_start': start, 'beta_end': end} if ours in S.RANGED_SCHEDULES else {}
  got = S.NoiseSchedule.create(ours, T, **kw).betas
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= TOL
  # alphas_cumprod too (diffusers computes it in float32 from its float32 betas).
  want_abar = np.cumprod(1 - want)
  assert np.max(np.abs(S.NoiseSchedule.create(ours, T, **kw).alphas_cumprod - want_abar)) <= TOL
  # make_schedule reads a config section and a model.json dict alike.
  section = {'beta_schedule': ours, 'num_timesteps': T, 'beta_start': start, 'beta_end': end}
  for cfg in (ml_collections.ConfigDict(section), section):
    np.testing.assert_array_equal(S.make_schedule(cfg).betas, got)


@pytest.mark.parametrize('theirs,ours,T,start,end', CASES)
def test_scheduler_config_through_the_converter(tmp_path, theirs, ours, T, start, end):
  """A diffusers scheduler_config.json -> converter settings -> model.json's schedule."""
  sched, want = _reference('DDPMScheduler', theirs, T, start, end)
  sched.save_config(tmp_path / 'scheduler')
  found, path = diffusers_lib.scheduler_settings(tmp_path / 'unet' / 'weights.safetensors')
  assert found['beta_schedule'] == ours and path.endswith('scheduler_config.json')
  diffusion = common_lib.diffusion_settings(found, None, path)
  got = checkpoints.schedule_from(json.loads(json.dumps(diffusion))).betas
  assert np.max(np.abs(got - want)) <= TOL


def test_scaled_linear_is_not_linear():
  """The two ranged schedules differ (a mix-up would be silent otherwise)."""
  a = S.NoiseSchedule.create('scaled_linear', 1000, beta_start=0.0015, beta_end=0.0195)
  b = S.NoiseSchedule.create('linear', 1000, beta_start=0.0015, beta_end=0.0195)
  assert a.betas[0] == pytest.approx(0.0015) and a.betas[-1] == pytest.approx(0.0195)
  assert abs(a.betas[500] - b.betas[500]) > 1e-4


def test_refusals(tmp_path):
  with pytest.raises(ValueError, match='needs beta_start and beta_end'):
    S.NoiseSchedule.create('scaled_linear', 10)
  with pytest.raises(ValueError, match='must be positive'):
    S.NoiseSchedule.create('scaled_linear', 10, beta_start=-1e-4, beta_end=0.02)
  with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
    S.make_schedule({'beta_schedule': 'sigmoid', 'num_timesteps': 10})
  folder = tmp_path / 'scheduler'
  folder.mkdir()
  weights = tmp_path / 'unet' / 'weights.safetensors'
  for field, value in (
    ('beta_schedule', 'sigmoid'),
    ('beta_schedule', 'laplace'),
    ('trained_betas', [0.1, 0.2]),
    ('rescale_betas_zero_snr', True),
  ):
    (folder / 'scheduler_config.json').write_text(json.dumps({field: value}))
    with pytest.raises(ConversionError, match=field):
      diffusers_lib.scheduler_settings(weights)
