"""Shipped targets (safetensors + recipe + split), the target's sample check, the DRC sweep and
its cost frontier."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config

from drc_jax.analysis import export, frontier, sweep
from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import modes as pipeline
from drc_jax.audit import samples as S
from drc_jax.audit import scoring as A
from drc_jax.audit import store
from drc_jax.core import errors
from drc_jax.data import splits
from drc_jax.targets import checkpoints, shipped
from drc_jax.targets import load as T


def _config():
  c = load_config('fashion_mnist', 'runlocal')
  c.data.resolution = 8
  c.model.ch, c.model.norm_groups, c.model.attn_res = 16, 8, (4,)
  c.split.num_members, c.split.num_nonmembers = 16, 32
  c.train.steps, c.train.lr, c.train.warmup_steps = 40, 2e-3, 5
  c.train.checkpoint_every, c.train.log_every = 20, 10
  c.attacks.names = 'drc,loss'
  c.audit.batch_size, c.audit.shard_size, c.audit.num_samples = 16, 16, 16
  return c


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A tiny target trained in a workdir, then exported as a shipped-target directory."""
  root = tmp_path_factory.mktemp('ship')
  wd, out = root / 'w', root / 'targets' / 'tiny'
  c = _config()
  pipeline.run(c, str(wd), 'train')
  export.export(str(wd), str(out), step=40, config=c, command='python -m drc_jax.main ...')
  return wd, out


def test_export_loads_the_same_weights_and_records_hashes(exported):
  wd, out = exported
  assert sorted(os.listdir(out)) == ['ema.safetensors', 'model.json', 'split.json', 'training.json']
  doc = json.loads((out / 'training.json').read_text())
  assert set(doc['sha256']) == {'model.json', 'ema.safetensors', 'split.json'}
  assert [r['step'] for r in doc['training_log']] == []  # no log file was given
  a, b = T.load_target(str(out)), T.load_target(str(wd / 'checkpoints' / '40'))
  assert a.step == b.step == 40
  for (ka, va), (kb, vb) in zip(
    sorted(T.model_lib.flat_params(a.params).items()),
    sorted(T.model_lib.flat_params(b.params).items()),
  ):
    assert ka == kb
    np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def test_a_changed_shipped_file_is_refused_naming_it(exported, tmp_path):
  _, out = exported
  bad = tmp_path / 'tiny'
  shutil.copytree(out, bad)
  raw = bytearray((bad / 'ema.safetensors').read_bytes())
  raw[-3] ^= 0x01  # one flipped bit in a weight
  (bad / 'ema.safetensors').write_bytes(bytes(raw))
  with pytest.raises(checkpoints.CheckpointError, match='ema.safetensors: SHA-256'):
    T.load_target(str(bad))


def test_a_shipped_target_without_its_record_is_refused(exported, tmp_path):
  _, out = exported
  bad = tmp_path / 'tiny'
  shutil.copytree(out, bad)
  (bad / 'training.json').unlink()
  with pytest.raises(checkpoints.CheckpointError, match='training.json: missing'):
    T.load_target(str(bad))
  shutil.copy(Path(out) / 'training.json', bad / 'training.json')
  doc = json.loads((bad / 'training.json').read_text())
  del doc['sha256']['ema.safetensors']  # a record that no longer covers the weights
  (bad / 'training.json').write_text(json.dumps(doc))
  raw = bytearray((bad / 'ema.safetensors').read_bytes())
  raw[-3] ^= 0x01
  (bad / 'ema.safetensors').write_bytes(bytes(raw))
  with pytest.raises(
    checkpoints.CheckpointError, match=r"records no SHA-256 of \['ema.safetensors'\]"
  ):
    T.load_target(str(bad))


def test_export_refuses_a_recipe_that_does_not_reproduce_the_step(exported, tmp_path):
  wd, _ = exported
  c = _config()
  c.train.steps = 20
  with pytest.raises(ValueError, match='config.train.steps'):
    export.export(str(wd), str(tmp_path / 'x'), step=40, config=c, command='')


def test_unknown_shipped_name_is_an_error():
  with pytest.raises(checkpoints.CheckpointError, match='no shipped target named'):
    shipped.resolve('shipped:nope')


def test_audit_of_a_shipped_target_checks_the_split(exported, tmp_path):
  _, out = exported
  c = _config()
  c.audit.checkpoint = str(out)
  m = pipeline.run(c, str(tmp_path / 'audit'), 'all')  # no training: the target is given
  assert not (tmp_path / 'audit' / 'checkpoints').exists()
  assert set(m) == {'drc', 'loss', 'blind'}
  figures = json.loads((tmp_path / 'audit' / 'samples.json').read_text())
  assert figures['num_samples'] == 16 and 0.0 <= figures['precision'] <= 1.0
  c2 = _config()
  c2.audit.checkpoint = str(out)
  c2.split.seed = 1  # other members than the target was trained on
  with pytest.raises(errors.UserError, match='trained on other data'):
    A.run_audit(c2, str(tmp_path / 'other'))  # model.json's trained_on (added by the export)
  assert not (tmp_path / 'other' / 'scores').exists()


def test_the_shipped_default_target_loads_and_matches_its_hashes():
  """The target shipped in the repository: files intact, loadable, recipe = the default config."""
  directory = shipped.resolve('shipped:fashion_mnist')
  doc = shipped.verify(directory)
  assert set(doc['sha256']) == {*shipped.HASHED, shipped.THRESHOLDS_JSON}
  target = T.load_target('shipped:fashion_mnist')
  c = load_config('fashion_mnist')
  assert target.step == c.train.steps == doc['step']
  assert target.config == T.model_lib.unet_config_from(c.model, c.data.resolution, c.data.channels)
  for field in ('split', 'model', 'train', 'diffusion', 'data'):
    # fields added to the config after the target was made count at their defaults only
    want = store.without_later_defaults(
      field, json.loads(json.dumps(c[field].to_dict(), default=list))
    )
    assert doc['config'][field] == want, field
  manifest = splits.load(os.path.join(directory, 'split.json'))
  assert len(manifest.members) == c.split.num_members
  assert len(manifest.nonmembers) == c.split.num_nonmembers
  assert os.path.getsize(os.path.join(directory, 'ema.safetensors')) < 20e6
  # the audit protocol it records is the one that ships (the training config's DRC is not)
  for field in ('drc', 'attacks'):
    assert doc['audit_protocol'][field] == json.loads(
      json.dumps(c[field].to_dict(), default=list)
    ), field
  thresholds = json.loads(open(os.path.join(directory, shipped.THRESHOLDS_JSON)).read())
  assert set(thresholds['nonmember_scores']) == set(c.attacks.names.split(','))


def test_precision_recall_and_near_copies_by_hand():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(40, 4, 4, 1))
  p, r = S.precision_recall(real[:20] + 1e-3, real[20:] * 0 + real[:20], k=3)
  assert p == 1.0 and r == 1.0  # samples on top of the real points
  far = real[:20] + 100.0
  p, r = S.precision_recall(far, real[:20], k=3)
  assert p == 0.0 and r == 0.0
  members = rng.normal(size=(60, 4, 4, 1))
  samples = np.concatenate([members[:5] + 1e-3, rng.normal(size=(5, 4, 4, 1))])
  is_copy, nearest, _ = S.near_copies(samples, members)
  np.testing.assert_array_equal(is_copy, [True] * 5 + [False] * 5)
  np.testing.assert_array_equal(nearest[:5], np.arange(5))


def test_sweep_selects_on_calibration_only():
  R = sweep.Row
  rows = [
    R('a', 'm', 'mean', 1, 10, 0.80, 0.99, 0.0, {}),
    R('b', 'm', 'mean', 1, 100, 0.90, 0.50, 0.0, {}),
    R('c', 'm', 'mean', 1, 50, 0.895, 0.60, 0.0, {}),
  ]
  best, chosen = sweep.select(rows, 0.01)
  assert best.setting == 'b' and chosen.setting == 'c'  # held-out AUC plays no part
  sims = np.array([[-1.0, -2.0, -4.0], [-0.5, -0.5, -0.5]])
  np.testing.assert_allclose(sweep.aggregate(sims, 'mean', 'masked_mse'), [-7 / 3, -0.5])
  np.testing.assert_allclose(sweep.aggregate(sims, 'median', 'masked_mse'), [-2.0, -0.5])
  np.testing.assert_allclose(
    sweep.aggregate(sims, 'logmean', 'masked_mse'), [-np.log(8) / 3, -np.log(0.5)]
  )
  np.testing.assert_array_equal(sweep.aggregate(sims, 'agree', 'masked_mse', -1.5), [1, 3])
  assert sweep.aggregate(sims, 'logmean', 'psnr') is None


def test_sweep_end_to_end_on_a_tiny_target(exported, tmp_path):
  _, out = exported
  c = _config()
  grid = [
    (
      'ddim t=10 2 steps',
      dict(restorer='ddim', t_start=10, steps=2, mask='center_box', mask_ratio=0.25),
      2,
    )
  ]
  doc = sweep.run(
    c,
    str(out),
    str(tmp_path),
    heldout_members=4,
    heldout_nonmembers=8,
    tolerance=0.01,
    batch_size=16,
    grid=grid,
  )
  assert doc['n_calibration'] == {'members': 3, 'nonmembers': 6}  # 20% of 16 and of 32
  assert doc['n_heldout'] == {'members': 4, 'nonmembers': 8}
  assert {r['k'] for r in doc['rows']} == {1, 2}
  assert doc['chosen']['model_calls'] <= doc['best']['model_calls']
  assert (tmp_path / 'sweep.md').exists() and (tmp_path / 'sweep.png').exists()


def test_frontier_chooses_on_calibration_against_the_paper_setting():
  P = frontier.Point
  pts = [
    P('paper', 1, 2410, 3.0, 0.90, 0.80, 0.0, {}),
    P('mid', 1, 200, 0.3, 0.895, 0.50, 0.0, {}),  # within 0.01 on calibration: chosen
    P('cheap', 1, 20, 0.03, 0.85, 0.99, 0.0, {}),  # best held-out, but not on calibration
  ]
  assert frontier.choose(pts, pts[0], 0.01).setting == 'mid'
  assert frontier.choose(pts, pts[0], 0.1).setting == 'cheap'
  # K points: the mean of the first K similarities, cost and time in proportion to K.
  sims = np.array([[0.0, -4.0], [-1.0, -1.0], [-2.0, 0.0], [-3.0, -3.0]])
  is_member = np.array([1, 1, 0, 0], np.int8)
  heldout = np.array([False, True, False, True])
  k1, k2 = frontier.points('s', {}, 90, sims, 0.5, is_member, heldout)
  assert (k1.k, k1.model_calls, k1.seconds_per_image) == (1, 90, 0.25)
  assert (k2.k, k2.model_calls, k2.seconds_per_image) == (2, 180, 0.5)
  assert k1.auc_calibration == 1.0 and k2.auc_calibration == 0.0  # -2 vs -1, then -2 vs -1 swap
  assert k1.auc_heldout == k2.auc_heldout == 1.0
  # The paired difference from the reference on the held-out part, with its bootstrap interval.
  rng = np.random.default_rng(0)
  is_member = np.repeat(np.array([1, 0], np.int8), 40)
  heldout = np.tile([False, True], 40)
  ref = rng.normal(size=80) + 0.5 * is_member
  d, ci = frontier.paired_delta(ref, ref, is_member, heldout)
  assert d == 0.0 and ci == (0.0, 0.0)
  better = ref + 3.0 * is_member
  d, (lo, hi) = frontier.paired_delta(better, ref, is_member, heldout)
  held = heldout & (is_member == 1), heldout & (is_member == 0)
  want = metrics_lib.auc(better[held[0]], better[held[1]]) - metrics_lib.auc(
    ref[held[0]], ref[held[1]]
  )
  assert d == pytest.approx(want) and 0.0 < lo <= d <= hi


def test_frontier_refuses_an_encoder_comparator_before_restoring(tmp_path):
  c = _config()
  c.drc.comparator = 'cosine'
  with pytest.raises(errors.UserError, match=r"drc.comparator='cosine'.*masked_mse"):
    frontier.run(
      c,
      str(tmp_path / 'no-target-needed'),
      str(tmp_path),
      heldout_members=4,
      heldout_nonmembers=8,
      tolerance=0.01,
      batch_size=16,
    )
  assert not list(tmp_path.iterdir())  # nothing written


def test_frontier_end_to_end_on_a_tiny_target(exported, tmp_path):
  _, out = exported
  grid = [
    ('4 steps, jumps 2 x 2', frontier._repaint(4, 2, 2), 1),
    ('2 steps, no jumps', frontier._repaint(2, 1, 1), 2),
  ]
  doc = frontier.run(
    _config(),
    str(out),
    str(tmp_path),
    heldout_members=4,
    heldout_nonmembers=8,
    tolerance=0.01,
    batch_size=16,
    grid=grid,
  )
  assert doc['n_heldout'] == {'members': 4, 'nonmembers': 8}
  assert [(p['setting'], p['k'], p['model_calls']) for p in doc['points']] == [
    ('4 steps, jumps 2 x 2', 1, 6),
    ('2 steps, no jumps', 1, 2),
    ('2 steps, no jumps', 2, 4),
  ]
  assert doc['reference']['setting'] == '4 steps, jumps 2 x 2'
  assert doc['reference']['delta_heldout'] == 0.0
  saved = np.load(tmp_path / 'frontier_sims.npz')
  assert saved['sims_0'].shape == (len(saved['indices']), 1)
  assert saved['sims_1'].shape == (len(saved['indices']), 2)
  assert int(saved['heldout'].sum()) == 12
  assert doc['chosen']['model_calls'] <= 6
  assert doc['speedup_model_calls'] == 6 / doc['chosen']['model_calls']
  table = (tmp_path / 'frontier.md').read_text()
  assert '(reference)' in table or '**(chosen)**' in table
  assert (tmp_path / 'frontier.png').exists() and (tmp_path / 'frontier.json').exists()
  # Re-reading the saved scores with the run's own partition gives the run's figures exactly.
  again = frontier.reread(str(tmp_path), saved['heldout'], frontier.PARTS)
  assert json.dumps(again['points']) == json.dumps(doc['points'])
  # Fresh reading: choose on every image an earlier (2, 4) run scored, report on the others.
  _, _, earlier, _, earlier_held = sweep.image_indices(_config(), str(tmp_path), 2, 4)
  seen = np.isin(saved['indices'], earlier[earlier_held]) | ~saved['heldout']
  fresh = frontier.reread_fresh(_config(), str(tmp_path), str(tmp_path), (2, 4))
  member = saved['is_member'] == 1
  assert fresh['n_heldout'] == {
    'members': int((~seen & member).sum()),
    'nonmembers': int((~seen & ~member).sum()),
  }
  assert fresh['n_calibration']['members'] == int((seen & member).sum())
  assert fresh['n_heldout']['members'] >= 2  # 4 drawn before, 2 now: at least 2 are fresh
  assert '| AUC selection | AUC fresh held-out |' in (tmp_path / 'frontier_fresh.md').read_text()
  assert (tmp_path / 'frontier_fresh.png').exists()
  other = _config()
  other.seed = 1  # another calibration part: the saved run is not this config's
  with pytest.raises(errors.UserError, match='calibration images are not those of this config'):
    frontier.reread_fresh(other, str(tmp_path), str(tmp_path / 'other'), (2, 4))


def test_noise_samples_are_flagged_against_real_images(fmnist_local):
  """A 'target' whose samples are pure noise gets the warning, real images do not."""
  from drc_jax.data import sources as data  # pylint: disable=g-import-not-at-top

  source = data.make_source(fmnist_local.data)
  real, _, _ = data.load_images(source, np.arange(300), fmnist_local.data)
  members, nonmembers = real[:100], real[100:]
  noise = np.clip(np.random.default_rng(0).normal(size=(64,) + real.shape[1:]), -1, 1)
  figures, *_ = S.quality(noise, members, nonmembers)
  assert figures['noise_fraction'] > 0.9 and figures['warnings']
  figures, *_ = S.quality(real[:64], members, nonmembers)  # members themselves as 'samples'
  assert figures['noise_fraction'] < 0.1 and not figures['warnings']
  assert figures['near_copy_fraction'] > 0.99  # each is its own nearest member
