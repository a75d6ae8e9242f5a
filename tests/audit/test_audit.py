"""The audit end to end on a tiny target trained hard on few real Fashion-MNIST members."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from drc_jax.audit import generated as generated_lib
from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import modes as pipeline
from drc_jax.audit import scoring as A
from drc_jax.audit import store, validate
from drc_jax.audit import summary as summary_lib
from drc_jax.core import errors
from drc_jax.data import sources as D
from drc_jax.targets import checkpoints
from drc_jax.targets import train as T

ATTACKS = ('drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse')


def _config():
  """32 members at 8x8, each seen 300 times by a tiny UNet: a target trained hard."""
  c = load_config('fashion_mnist', 'runlocal')
  c.data.resolution = 8
  c.model.ch, c.model.norm_groups, c.model.attn_res = 32, 8, (4,)
  c.split.num_members = c.split.num_nonmembers = 32
  c.train.steps, c.train.lr, c.train.warmup_steps = 600, 2e-3, 20
  c.train.checkpoint_every, c.train.log_every = 600, 100
  c.train.ema_decay, c.train.random_flip = 0.99, False
  c.drc.restorer, c.drc.mask_ratio, c.drc.num_restorations = 'repaint', 0.25, 2
  c.drc.steps, c.drc.jump_length, c.drc.jump_n_sample = 25, 5, 3
  c.audit.batch_size, c.audit.shard_size = 16, 16
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A target trained hard (300 epochs) on 32 members."""
  wd = tmp_path_factory.mktemp('target')
  c = _config()
  c.attacks.names = 'loss'  # train only here; tests audit copies
  pipeline.run(c, str(wd), 'train')
  return wd


def _copy_target(trained, tmp_path):
  wd = tmp_path / 'w'
  shutil.copytree(trained, wd)
  return str(wd)


def test_every_attack_finds_the_members_and_the_report_renders(trained, tmp_path, monkeypatch):
  wd = _copy_target(trained, tmp_path)
  metrics = pipeline.run(_config(), wd, 'all')
  # The score direction: members score higher. PIAN is the exception on such tiny, memorising
  # targets (measured AUC about 0.4: eps(x0, 0) of a memorised member is near 0, and PIAN's
  # rescaling blows that up to unit size), so it is only checked to produce finite scores.
  for name in ATTACKS:
    if name != 'pian':
      assert metrics[name]['auc'] > 0.5, (name, metrics[name]['auc'])
    assert metrics[name]['scope'] == 'heldout'  # the calibration part (6 + 6 images) left out
    assert metrics[name]['n_members'] == metrics[name]['n_nonmembers'] == 26
    assert metrics[name]['all_images']['n_members'] == 32
    assert metrics[name]['warnings']  # 32 non-members: TPR@1%FPR rests on < 10 false positives
  assert np.all(np.isfinite(store.load_scores(wd)['score/pian']))
  assert metrics['secmi']['nfe_per_image'] == 11
  assert metrics['drc']['nfe_per_image'] == 2 * (25 + 4 * 2 * 5)  # K x RePaint(25, 5, 3)
  saved = json.loads(open(f'{wd}/metrics.json').read())
  assert (
    set(saved) == {*ATTACKS, 'blind'} and 'calibrated' in saved['drc'] and 'agree' in saved['drc']
  )
  assert saved['blind']['access'] == 'none' and saved['blind']['model_calls'] == 0  # the control
  assert not any('without the model' in w for w in saved['blind']['warnings'])  # a random split
  assert saved['drc']['access'] == 'black-box' and saved['loss']['access'] == 'gray-box'
  assert saved['drc']['model_calls'] == saved['drc']['nfe_per_image']
  html = open(f'{wd}/report.html').read()
  for name in ATTACKS:
    assert name in html
  assert html.count('data:image/png;base64') >= 4 + 3  # plots + evidence panels
  table = store.load_scores(wd)
  assert len(table['index']) == 64 and len(set(table['index'].tolist())) == 64
  assert table['drc/sim'].shape == (64, 2)
  np.testing.assert_allclose(table['score/drc'], table['drc/sim'].mean(axis=1))
  # The generated-image control scored exactly the samples the sample check drew.
  _check_generated_control(wd, saved)
  # --mode=report redraws from the workdir alone: any config (here the embedded default), no
  # model, no image read, no file but the report's changed.
  before = _hashes(wd)
  os.remove(f'{wd}/report.html')
  monkeypatch.setattr(A, 'make_scorer', _refuse)
  monkeypatch.setattr(D, 'make_source', _refuse)
  # the target's files are those the scores were computed from (their digest was saved): the
  # model is not loaded to check them
  assert (Path(wd) / store.TARGET_FILES).exists()
  monkeypatch.setattr(store.target_lib, 'load_target', _refuse)
  again = pipeline.run(load_config('fashion_mnist'), wd, 'report')
  assert again == saved
  after = _hashes(wd)
  changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
  assert changed <= {'report.html'} | {
    k for k in before if k.startswith('report/') and k.endswith('.png')
  }
  assert 'report.html' in after


def _refuse(*args, **kwargs):
  raise AssertionError('--mode=report must not build a model or read images')


def _hashes(wd) -> dict[str, str]:
  """SHA-256 of every file under ``wd`` (relative path -> digest), the lock file aside."""
  out = {}
  for p in sorted(Path(wd).rglob('*')):
    if p.is_file() and p.name != '.drc_jax.lock':
      out[str(p.relative_to(wd))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _check_generated_control(wd, saved):
  """Every attack's generated FPR comes from the samples of samples.npz, scored one by one."""
  samples = np.load(f'{wd}/samples.npz')['samples']
  assert samples.shape == (16, 8, 8, 1)  # :runlocal draws 16 samples
  gen = np.load(f'{wd}/generated.npz')
  c = _config()
  scorer = A.make_scorer(c, wd)
  src = generated_lib.SampleSource(samples)
  images = D.preprocess(src.images, c.data)
  eight_bit = np.round((np.clip(samples, -1, 1) + 1) * 127.5) / 127.5 - 1
  np.testing.assert_allclose(images, eight_bit, atol=1e-6)  # the samples, as 8-bit images
  for name in ('loss', 'sima'):  # one sample at a time, outside the batched, cached path
    att = scorer.attacks[name]
    keys = generated_lib.keys_for([name], c.seed, np.arange(16))[name]
    direct = np.concatenate(
      [
        np.asarray(att.scores(scorer.target.params, keys[i : i + 1], images[i : i + 1]))
        for i in range(16)
      ]
    )
    np.testing.assert_allclose(gen[f'score/{name}'], direct, rtol=2e-4, atol=1e-6)
  assert gen['score/drc'].shape == (16, 2)  # DRC's similarities, scored by the audit's rule
  for name in scorer.names:
    g, cal = saved[name]['generated'], saved[name]['calibrated']
    s = gen[f'score/{name}']
    if name == 'drc':
      assert saved['drc']['aggregation'] == 'mean'
      s = s.mean(axis=1)
    assert g['n'] == 16
    assert g['fpr'] == np.mean(s >= cal['threshold'])
    assert g['real_nonmember_fpr'] == cal['fpr']
  assert 'blind' not in {k for k, v in saved.items() if 'generated' in v}


def test_resume_after_a_crash_gives_identical_scores(trained, tmp_path, monkeypatch):
  c = _config()
  c.attacks.names = 'drc,loss,pia'
  ref_wd = _copy_target(trained, tmp_path / 'ref')
  A.run_audit(c, ref_wd)
  ref = store.load_scores(ref_wd)

  wd = _copy_target(trained, tmp_path / 'crash')
  real_write = store.write_npz
  calls = []

  def crash_after_two(path, arrays):
    if len(calls) == 2:
      raise KeyboardInterrupt('simulated kill')  # dies between shards, as kill -9 would
    calls.append(path)
    real_write(path, arrays)

  monkeypatch.setattr(store, 'write_npz', crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    A.run_audit(c, wd)
  monkeypatch.setattr(store, 'write_npz', real_write)
  assert len(list((tmp_path / 'crash' / 'w' / 'scores').glob('shard_*.npz'))) == 2
  (tmp_path / 'crash' / 'w' / 'scores' / '.shard_00002.npz.tmp-1-deadbeef').write_bytes(b'half')
  A.run_audit(c, wd)  # rerun the same command
  got = store.load_scores(wd)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  assert sorted(got['index'].tolist()) == sorted(set(got['index'].tolist()))


def test_a_damaged_shard_is_named_and_scored_again(trained, tmp_path):
  c = _loss_config()
  wd = _copy_target(trained, tmp_path)
  A.run_audit(c, wd)
  ref = store.load_scores(wd)
  shard = Path(wd) / 'scores' / 'shard_00001.npz'
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 0x40  # a flipped bit inside the shard
  shard.write_bytes(bytes(raw))
  with pytest.raises(store.DamagedShard, match='shard_00001.npz: damaged score shard'):
    pipeline.run(c, wd, 'report')  # the report names it and changes nothing
  shard.write_bytes(bytes(raw[: len(raw) // 3]))  # truncated
  with pytest.raises(store.DamagedShard, match='shard_00001.npz: damaged score shard'):
    store.load_scores(wd)
  A.run_audit(c, wd)  # the audit scores it again
  got = store.load_scores(wd)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])


def test_a_shard_of_another_fingerprint_never_counts_as_done(trained, tmp_path):
  c = _loss_config()
  wd = _copy_target(trained, tmp_path)
  A.run_audit(c, wd)
  ref = store.load_scores(wd)
  shard = Path(wd) / 'scores' / 'shard_00000.npz'
  arrays, _ = store.read_shard(shard)
  arrays['score/loss'] = arrays['score/loss'] + 1.0  # scored by another run, another loss_t
  store.write_shard(shard, arrays, 'f' * 64)
  assert store.shard_problem(shard, 'e' * 64).endswith('(fingerprint ffffffffffff...)')
  with pytest.raises(errors.WorkdirError, match='shard_00000.npz: scored under another'):
    pipeline.run(c, wd, 'report')
  A.run_audit(c, wd)
  np.testing.assert_array_equal(store.load_scores(wd)['score/loss'], ref['score/loss'])


def test_a_config_of_another_architecture_is_refused_in_every_mode(trained, tmp_path):
  wd = _copy_target(trained, tmp_path)
  c = _loss_config(model__ch=8)
  for mode in ('train', 'audit', 'all'):
    with pytest.raises(checkpoints.CheckpointError, match='config.model.ch: 8, trained with 32'):
      pipeline.run(c, wd, mode)
  # --mode=report takes no config (it redraws saved results): here there are none to redraw
  with pytest.raises(errors.WorkdirError, match='holds no audit results'):
    pipeline.run(c, wd, 'report')
  assert not (Path(wd) / 'scores').exists()


def test_an_edited_model_json_never_mixes_two_schedules(trained, tmp_path):
  wd = _copy_target(trained, tmp_path)
  A.run_audit(_loss_config(), wd)
  (Path(wd) / 'scores' / 'shard_00001.npz').unlink()
  before = _results(wd)
  doc = json.loads((Path(wd) / 'model.json').read_text())
  doc['diffusion']['beta_end'] = 0.03
  (Path(wd) / 'model.json').write_text(json.dumps(doc))
  with pytest.raises(checkpoints.CheckpointError, match='config.diffusion.beta_end: 0.02, trained'):
    pipeline.run(_loss_config(), wd, 'audit')
  with pytest.raises(store.AuditConfigMismatch, match='description_sha256'):
    A.run_audit(_loss_config(), wd)  # the library call: the fingerprint holds the description
  assert _results(wd) == before


def test_one_run_per_workdir(trained, tmp_path):
  from drc_jax.core import fileio  # pylint: disable=g-import-not-at-top

  wd = _copy_target(trained, tmp_path)
  with fileio.workdir_lock(wd, errors.WorkdirError):
    with pytest.raises(errors.WorkdirError, match=r'in use by another drc_jax run \(pid \d+ on '):
      pipeline.run(_loss_config(), wd, 'audit')
  assert not (Path(wd) / 'scores').exists()
  pipeline.run(_loss_config(), wd, 'audit')  # released when its holder ends
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.WorkdirError, match='file: not a directory'):
    pipeline.run(_loss_config(), str(tmp_path / 'file'), 'audit')


def test_a_workdir_of_another_config_is_refused(trained, tmp_path):
  c = _config()
  c.attacks.names = 'loss'
  wd = _copy_target(trained, tmp_path)
  A.run_audit(c, wd)
  c2 = _config()
  c2.attacks.names = 'loss'
  c2.attacks.loss_t = 300
  with pytest.raises(store.AuditConfigMismatch, match='attacks.loss_t: 200 -> 300'):
    A.run_audit(c2, wd)
  m = A.run_audit(c2, wd, overwrite=True)
  assert set(m) == {'loss', 'blind'}
  c2.audit.bootstrap = 10  # metrics-only fields do not invalidate scores
  A.run_audit(c2, wd)


def test_bad_config_values_are_named():
  c = _config()
  c.drc.mask_ratio = 1.5
  with pytest.raises(validate.ConfigError, match='config.drc.mask_ratio'):
    validate.check(c)
  c = _config()
  c.audit.batch_size = 12  # 8 devices in tests
  with pytest.raises(validate.ConfigError, match='config.audit.batch_size'):
    validate.check(c)
  c = _config()
  c.attacks.names = 'drc,lira'
  with pytest.raises(validate.ConfigError, match="unknown attack 'lira'"):
    validate.check(c)


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('audit.bootstrap', 10**9, r'config.audit.bootstrap: 1000000000 \(expected an integer in'),
    ('audit.num_samples', -1, 'config.audit.num_samples: -1'),
    ('dataset.power_repetitions', 10**7, 'config.dataset.power_repetitions'),
    ('drc.num_restorations', 5000, 'config.drc.num_restorations'),
    ('diffusion.beta_end', -1.0, r'config.diffusion.beta_end: -1.0 not in \(0, 1\)'),
    ('diffusion.beta_start', float('nan'), r'config.diffusion.beta_start: nan not in \(0, 1\)'),
    ('diffusion.beta_start', 0.05, r'config.diffusion.beta_start \(0.05\) exceeds beta_end'),
  ],
)
def test_sizes_and_schedules_are_bounded_before_any_work(field, value, match):
  c = _config()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(validate.ConfigError, match=match):
    validate.check(c)


# ----------------------------------------------------------------------------------------------
# Results are never reused for another target, nor lost to a run whose inputs are wrong.


def _results(wd) -> dict[str, bytes]:
  """Every result file of a workdir (path relative to it -> bytes), superseded ones excluded."""
  out = {}
  for name in store.RESULTS:
    p = Path(wd) / name
    files = [p] if p.is_file() else sorted(f for f in p.rglob('*') if f.is_file())
    out.update({str(f.relative_to(wd)): f.read_bytes() for f in files if p.exists()})
  return out


def _loss_config(**kw):
  c = _config()
  c.attacks.names = 'loss'
  for k, v in kw.items():
    section, name = k.split('__')
    c[section][name] = v
  return c


def test_scores_of_another_target_are_never_reused(trained, tmp_path):
  wd = _copy_target(trained, tmp_path / 'a')
  pipeline.run(_loss_config(), wd, 'all')
  before = _results(wd)
  recorded = json.loads((Path(wd) / store.AUDIT_CONFIG).read_text())['target']
  assert recorded['step'] == 600 and len(recorded['ema_sha256']) == 64
  # The run: --config.train.steps=605 on an audited workdir trained on, then skipped
  # every shard. Now it is refused before training, and nothing changes.
  longer = _loss_config(train__steps=605)
  with pytest.raises(
    store.AuditConfigMismatch, match='target at step 600; training it to step 605'
  ):
    pipeline.run(longer, wd, 'all')
  assert _results(wd) == before and T.trained_steps(wd) == 600
  # With --overwrite it trains on, then audits anew; the old results move aside, whole.
  wd_b = tmp_path / 'b'
  shutil.copytree(wd, wd_b)
  pipeline.run(longer, str(wd_b), 'all', overwrite=True)
  assert T.trained_steps(str(wd_b)) == 605
  (old,) = (wd_b / store.SUPERSEDED_DIR).iterdir()
  assert _results(old) == before
  assert json.loads((wd_b / store.AUDIT_CONFIG).read_text())['target']['step'] == 605
  assert not np.array_equal(
    store.load_scores(str(wd_b))['score/loss'], store.load_scores(wd)['score/loss']
  )
  # A target changed behind the scores (same config): the audit and the report refuse.
  shutil.rmtree(Path(wd) / 'checkpoints')
  shutil.copytree(wd_b / 'checkpoints', Path(wd) / 'checkpoints')
  with pytest.raises(
    store.AuditConfigMismatch,
    match=r'target.ema_sha256: \w{12}\.\.\. -> \w{12}\.\.\.; '
    r'target.step: 600 -> 605',
  ):
    A.run_audit(_loss_config(), wd)
  with pytest.raises(store.AuditConfigMismatch, match='not those of this config and target'):
    pipeline.run(_loss_config(), wd, 'report')
  assert _results(wd) == before


def test_overwrite_validates_every_input_before_moving_anything(trained, tmp_path):
  wd = _copy_target(trained, tmp_path)
  A.run_audit(_loss_config(), wd)
  pipeline.run(_loss_config(), wd, 'report')
  before = _results(wd)
  assert {'metrics.json', 'report.html', store.AUDIT_CONFIG} <= set(before)
  np.savez(
    tmp_path / 'other.npz', mia_train_idxs=np.arange(100, 132), mia_eval_idxs=np.arange(200, 232)
  )
  bad = {
    'a missing folder': dict(data__source='folder', data__data_dir=str(tmp_path / 'none')),
    'another split': dict(split__num_members=20),
    'members the target was not trained on': dict(split__file=str(tmp_path / 'other.npz')),
    'another source': dict(
      data__source='tfds', data__name='cifar10', data__data_dir=str(tmp_path / 'no_tfds')
    ),
  }
  for why, kw in bad.items():
    with pytest.raises(errors.UserError):
      A.run_audit(_loss_config(attacks__loss_t=300, **kw), wd, overwrite=True)
    assert _results(wd) == before, why
    assert not (Path(wd) / store.SUPERSEDED_DIR).exists(), why
  A.run_audit(_loss_config(), wd)  # the original config is still accepted: nothing to score
  assert _results(wd) == before
  m = A.run_audit(_loss_config(attacks__loss_t=300), wd, overwrite=True)
  (old,) = (Path(wd) / store.SUPERSEDED_DIR).iterdir()
  assert _results(old) == before  # scores, metrics, report and their record, together
  saved = json.loads((Path(wd) / 'metrics.json').read_text())
  assert saved['loss']['auc'] == m['loss']['auc']
  table = store.load_scores(wd)
  members = table['split'] == 1
  assert m['loss']['all_images']['auc'] == metrics_lib.auc(
    table['score/loss'][members], table['score/loss'][~members]
  )
  mh, nh = metrics_lib.calibration_split(32, 32, fraction=0.2, seed=0)
  assert m['loss']['auc'] == metrics_lib.auc(
    table['score/loss'][members][mh], table['score/loss'][~members][nh]
  )
  assert summary_lib.format_metrics_table(m).startswith(
    'held-out images: 26 members, 26 non-members (the calibration part'
  )
  assert 'Metrics (held-out images)' in (Path(wd) / 'report.html').read_text()


def test_a_target_is_audited_only_on_the_data_it_was_trained_on(trained, tmp_path):
  recorded = checkpoints.trained_on(str(trained))
  c = _config()
  assert recorded['dataset'] == 'fashion_mnist/train' and recorded['num_members'] == 32
  assert (recorded['resolution'], recorded['channels']) == (8, 1)
  wd = _copy_target(trained, tmp_path)
  folder = tmp_path / 'digits'
  folder.mkdir()
  imgs, _ = D.FashionMnistSource('test').read(range(64))
  for i, im in enumerate(imgs):
    Image.fromarray(im[..., 0]).save(folder / f'{i:03d}.png')
  np.savez(
    tmp_path / 'folder_split.npz', mia_train_idxs=np.arange(32), mia_eval_idxs=np.arange(32, 64)
  )
  c = _loss_config(
    data__source='folder',
    data__data_dir=str(folder),
    split__file=str(tmp_path / 'folder_split.npz'),
  )
  with pytest.raises(
    D.DataError,
    match=r'model.json: the target was trained on other data .*'
    r"dataset: 'fashion_mnist/train' -> 'folder:",
  ):
    pipeline.run(c, wd, 'all')  # the target is reused: its training data is checked
  assert not (Path(wd) / 'scores').exists() and not (Path(wd) / store.AUDIT_CONFIG).exists()
  # A converted target records no training data: it is audited on any data.
  doc = json.loads((Path(wd) / 'model.json').read_text())
  doc.pop('trained_on')
  doc['source'] = 'converted:test'
  (Path(wd) / 'model.json').write_text(json.dumps(doc))
  assert set(pipeline.run(c, wd, 'all')) == {'loss', 'blind'}


def test_the_default_workdir_follows_the_data():
  c = load_config('fashion_mnist')
  assert pipeline.default_workdir('configs/fashion_mnist.py', c) == 'runs/fashion_mnist'
  c.data.source, c.data.data_dir = 'folder', '/data/digits/'
  assert (
    pipeline.default_workdir('configs/fashion_mnist.py', c) == 'runs/fashion_mnist_folder_digits'
  )
  assert (
    pipeline.default_workdir(
      'configs/celeba.py:runlocal,res=64', load_config('celeba', 'runlocal,res=64')
    )
    == 'runs/celeba-runlocal-res-64_tfds_celeb_a'
  )
  assert (
    pipeline.default_workdir('configs/cifar10.py', load_config('cifar10')) == 'runs/cifar10_tfds'
  )


def test_an_audit_reads_each_image_once(trained, tmp_path, monkeypatch):
  """Split check, scoring, labels and hashes, calibration features, samples and evidence all
  read through one run cache: the data source sees each image once."""
  wd = _copy_target(trained, tmp_path)
  reads = []
  real_make_source = D.make_source

  class Counting:
    def __init__(self, source):
      self.source, self.name = source, source.name
      self.label_names = getattr(source, 'label_names', ())

    def __len__(self):
      return len(self.source)

    def read(self, indices):
      reads.extend(int(i) for i in np.asarray(indices).reshape(-1))
      return self.source.read(indices)

  monkeypatch.setattr(D, 'make_source', lambda cfg: Counting(real_make_source(cfg)))
  c = _config()
  c.attacks.names = 'loss,drc'
  metrics = A.run_audit(c, wd)
  assert 'per_image_calibration' in metrics['drc'] and reads
  counts = np.bincount(reads)
  assert counts.max() == 1, f'images read more than once: {np.flatnonzero(counts > 1)[:10]}'
