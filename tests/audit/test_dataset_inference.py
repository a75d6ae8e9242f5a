"""Dataset inference: the combiner by hand, the test's false-positive rate, --mode=dataset."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from drc_jax.audit import combiners, metrics, stats, store, suspects, validate
from drc_jax.audit import dataset_inference as DI
from drc_jax.audit import modes as pipeline
from drc_jax.core import errors
from drc_jax.data import sources as D

ATTACKS = ('drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse')
DETERMINISTIC = ('secmi', 'pia', 'pian', 'sima')  # no noise key: same image, same score


def test_combiner_hand_case():
  # One member at +1, one non-member at -1 (already standardized): by symmetry b = 0, and the
  # optimality condition of  1/2 log(1 + e^-w) + 1/2 log(1 + e^-w) + l2/2 w^2  is
  # l2 w = 1 / (1 + e^w).
  c = combiners.fit_logistic([[1.0]], [[-1.0]], ['a'], l2=0.01)
  w = c.weights[0]
  assert abs(c.bias) < 1e-9 and w > 0
  assert 0.01 * w == pytest.approx(1 / (1 + np.exp(w)), abs=1e-12)
  np.testing.assert_allclose(c.score([[1.0], [-1.0]]), [w, -w])


def test_combiner_weights_the_informative_score_and_is_optimal():
  rng = np.random.default_rng(0)
  members = rng.normal(size=(60, 3)) * [1, 1, 5] + [0, 1.5, 0]  # only column 1 carries signal
  nonmembers = rng.normal(size=(400, 3)) * [1, 1, 5]
  c = combiners.fit_logistic(members, nonmembers, ['x', 'signal', 'wide'])
  assert c.weights[1] > 0.5 and abs(c.weights[0]) < 0.3 and abs(c.weights[2]) < 0.3
  # The gradient of the balanced, penalized log loss vanishes at the fit.
  x = np.concatenate([members, nonmembers])
  y = np.r_[np.ones(60), np.zeros(400)]
  cw = np.r_[np.full(60, 0.5 / 60), np.full(400, 0.5 / 400)]
  z = (x - c.mean) / c.scale
  p = 1 / (1 + np.exp(-(z @ c.weights + c.bias)))
  grad_w = z.T @ (cw * (p - y)) + combiners.COMBINER_L2 * c.weights
  assert np.max(np.abs(grad_w)) < 1e-9 and abs(np.sum(cw * (p - y))) < 1e-9


def test_compare_sets_reports_each_attack_and_the_combination():
  rng = np.random.default_rng(1)
  combiner = combiners.fit_logistic(
    rng.normal(1, 1, (50, 2)), rng.normal(0, 1, (50, 2)), ['a', 'b']
  )
  suspect, reference = rng.normal(1, 1, (20, 2)), rng.normal(0, 1, (100, 2))
  out = DI.compare_sets(suspect, reference, combiner, alpha=0.01)
  assert list(out) == ['combined', 'a', 'b']
  t = stats.mann_whitney_greater(suspect[:, 1], reference[:, 1])
  assert out['b']['p_value'] == t.p_value and out['b']['statistic'] == t.u
  assert out['b']['rank_biserial'] == pytest.approx(2 * t.auc - 1)
  delta = (suspect[:, 1].mean() - reference[:, 1].mean()) / reference[:, 1].std(ddof=1)
  assert out['b']['glass_delta'] == pytest.approx(delta)
  assert (
    out['combined']['p_value']
    == stats.mann_whitney_greater(combiner.score(suspect), combiner.score(reference)).p_value
  )
  assert out['combined']['reject'] and out['combined']['verdict'].startswith('member data detected')
  assert (out['a']['n_suspect'], out['a']['n_reference']) == (20, 100)


def test_a_set_too_small_to_ever_reject_says_so():
  rng = np.random.default_rng(3)
  combiner = combiners.fit_logistic(
    rng.normal(1, 1, (50, 2)), rng.normal(0, 1, (50, 2)), ['a', 'b']
  )
  reference = rng.normal(0, 1, (26, 2))
  one = DI.compare_sets(reference[:1] + 10.0, reference, combiner, alpha=0.01)['combined']
  assert one['smallest_p_value'] == pytest.approx(1 / 27) and one['min_suspects'] == 2
  assert not one['reject']
  assert one['verdict'].startswith(
    'cannot reject at this size: 1 suspect image(s) against 26 references reach at best '
    'p = 0.037, not below alpha = 0.01; the test needs at least 2 suspect images'
  )
  two = DI.compare_sets(reference[:2] + 10.0, reference, combiner, alpha=0.01)['combined']
  assert two['smallest_p_value'] == pytest.approx(1 / 378) and two['reject']
  assert two['verdict'].startswith('member data detected')


def test_power_curve_false_positive_rate_stays_within_alpha():
  # Members shifted by one standard deviation in one of two scores; 400 repetitions at alpha 0.05
  # so that the false-positive rate is measurable. Non-member sets come from the reference pool
  # and are tested against the rest of it: the rate must be at most alpha within its interval.
  rng = np.random.default_rng(2)
  combiner = combiners.fit_logistic(
    rng.normal(size=(100, 2)) + [1, 0], rng.normal(size=(100, 2)), ['signal', 'noise']
  )
  members, reference = rng.normal(size=(80, 2)) + [1, 0], rng.normal(size=(300, 2))
  power = DI.power_curve(
    members, reference, combiner, sizes=(1, 5, 20, 100, 200), repetitions=400, alpha=0.05, seed=0
  )
  assert power['members']['sizes'] == [1, 5, 20] and power['members']['skipped_sizes'] == [100, 200]
  assert power['nonmembers']['sizes'] == [1, 5, 20, 100]
  assert power['nonmembers']['skipped_sizes'] == [200]
  assert power['repetitions_needed'] == stats.repetitions_to_show(0.05) == 72
  nonmembers = power['nonmembers']
  for name in ('combined', 'signal', 'noise'):
    # The rate is at most alpha within its interval; the check reports the interval's upper end
    # and passes only where it is at most alpha (a test of size alpha itself: seldom).
    assert all(lo <= 0.05 for lo, _ in nonmembers[name]['ci95']), nonmembers[name]
    for k, (lo, hi), upper, within, status in zip(
      nonmembers[name]['rejections'],
      nonmembers[name]['ci95'],
      nonmembers['fpr_upper'][name],
      nonmembers['within_alpha'][name],
      nonmembers['fpr_check'][name],
    ):
      assert (lo, hi) == stats.clopper_pearson(k, 400) and upper == hi
      assert within == (hi <= 0.05) and status == ('shown' if within else 'not shown')
  tpr = power['members']['combined']['rate']
  assert tpr[0] < tpr[1] < tpr[2] and tpr[2] > 0.95  # power grows with the set size
  assert max(power['members']['noise']['rate']) < 0.15  # a score without signal has none
  again = DI.power_curve(
    members, reference, combiner, sizes=(1, 5, 20, 100, 200), repetitions=400, alpha=0.05, seed=0
  )
  assert again == power  # seeded
  # 50 repetitions cannot show a rate <= 0.05 even with no rejection (72 can): said, not passed.
  few = DI.power_curve(members, reference, combiner, sizes=(5,), repetitions=50, alpha=0.05, seed=0)
  assert few['repetitions_needed'] == 72
  assert few['nonmembers']['fpr_check']['combined'] == ['too few repetitions']
  assert few['nonmembers']['within_alpha']['combined'] == [False]


def test_dataset_config_errors_name_the_field(tmp_path):
  c = load_config('fashion_mnist', 'runlocal')
  validate.check(c)
  for field, value, match in (
    ('suspect', 'both', 'config.dataset.suspect'),
    ('alpha', 0.7, 'config.dataset.alpha'),
    ('size', 0, 'config.dataset.size'),
    ('power_sizes', (1, 0), 'config.dataset.power_sizes'),
    ('power_repetitions', 0, 'config.dataset.power_repetitions'),
    ('combiner', 'logistic', 'config.dataset.combiner'),
  ):
    bad = load_config('fashion_mnist', 'runlocal')
    bad.dataset[field] = value
    with pytest.raises(validate.ConfigError, match=match):
      validate.check(bad)
  with pytest.raises(validate.ConfigError, match='set exactly one'):
    validate.check_dataset(c, require_suspect=True)
  c.dataset.suspect, c.dataset.suspect_dir = 'members', str(tmp_path)
  with pytest.raises(validate.ConfigError, match='set exactly one'):
    validate.check_dataset(c, require_suspect=True)
  c.dataset.suspect, c.dataset.suspect_dir = '', str(tmp_path / 'nope')
  with pytest.raises(validate.ConfigError, match='config.dataset.suspect_dir: .*nope is not a dir'):
    validate.check_dataset(c, require_suspect=True)
  # A set is named after its folder, or its draw, unless config.dataset.name names it.
  c.dataset.suspect_dir = str(tmp_path)
  assert validate.dataset_name(c) == tmp_path.name
  c.dataset.suspect_dir, c.dataset.suspect, c.dataset.size = '', 'nonmembers', 20
  assert validate.dataset_name(c) == 'nonmembers-20'
  c.dataset.name = 'mine_v2.1'
  assert validate.dataset_name(c) == 'mine_v2.1'
  for bad in ('.hidden', 'a/b', 'x' * 101, 'é'):
    c.dataset.name = bad
    with pytest.raises(validate.ConfigError, match=r'config.dataset.name: .* not a safe file name'):
      validate.check(c)
  for field, value in (
    ('calibration', 'isotonic'),
    ('calibration_fpr', 0.0),
    ('calibration_l2', -1.0),
  ):
    bad = load_config('fashion_mnist', 'runlocal')
    bad.audit[field] = value
    with pytest.raises(validate.ConfigError, match=f'config.audit.{field}'):
      validate.check(bad)


def test_dataset_fields_parse_from_the_command_line():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = [
    'prog',
    f'--config={REPO}/configs/fashion_mnist.py',
    '--config.dataset.suspect=members',
    '--config.dataset.size=50',
    '--config.dataset.power_sizes=(1,5)',
    '--config.audit.calibration=none',
  ]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=fv, sys_argv=argv, lock_config=True
  )
  fv(argv)
  c = fv.config
  assert (c.dataset.suspect, c.dataset.size) == ('members', 50)
  assert tuple(c.dataset.power_sizes) == (1, 5)
  assert c.audit.calibration == 'none' and c.dataset.alpha == 0.01
  validate.check_dataset(c, require_suspect=True)
  assert 'dataset' in pipeline.MODES


# ----------------------------------------------------------------------------------------------
# --mode=dataset end to end on the runlocal target.


def _config(**dataset):
  c = load_config('fashion_mnist', 'runlocal')
  c.dataset.power_sizes = (1, 2, 5)
  c.dataset.power_repetitions = 20
  c.dataset.update(dataset)
  return c


@pytest.fixture(scope='module')
def audited(tmp_path_factory):
  """The runlocal target, trained and audited once (32 members, 32 non-members)."""
  wd = tmp_path_factory.mktemp('audited')
  pipeline.run(_config(), str(wd), 'all')
  return wd


def _copy(audited, tmp_path):
  wd = tmp_path / 'w'
  shutil.copytree(audited, wd)
  return str(wd)


def _count_writes(monkeypatch):
  written = []
  real = store.write_npz

  def counting(path, arrays):
    written.append((str(path), len(arrays['index'])))
    real(path, arrays)

  monkeypatch.setattr(store, 'write_npz', counting)
  return written


def _check_evidence(wd, result, n):
  """The set's saved panels are of its n suspects of highest combined score, and exact: the shown
  restoration's MSE on the removed pixels is the similarity its DRC score was computed from."""
  (saved,) = [
    r
    for r in suspects.read_results(wd, store.recorded_fingerprint(wd))
    if r['name'] == result['name']
  ]
  items = saved['evidence']
  assert [e['rank'] for e in items] == list(range(1, n + 1))
  assert [e['combined'] for e in items] == sorted((e['combined'] for e in items), reverse=True)
  for e in items:
    assert e['split'] == 'suspect' and e['restorations'].shape[0] == len(e['similarities'])
    region = np.all(e['degraded'] == 0, axis=-1)  # removed pixels are 0 (mid grey)
    assert 0 < region.sum() < region.size
    mse = np.mean(np.square(e['original'] - e['restored'])[region])
    assert -mse == pytest.approx(e['similarities'][e['shown_restoration']], rel=1e-3, abs=1e-7)


def test_mode_dataset_reuses_the_audit_scores(audited, tmp_path, monkeypatch):
  wd = _copy(audited, tmp_path)
  written = _count_writes(monkeypatch)
  c = _config(suspect='members', size=5)
  result = pipeline.run(c, wd, 'dataset')
  assert written == []  # every image of the split was scored by the audit already
  saved = json.loads(open(f'{wd}/dataset/suspects/members-5/dataset.json').read())
  assert saved == result and result['name'] == 'members-5'
  _check_evidence(wd, result, 1)  # runlocal: audit.num_evidence = 1
  assert list(result['tests']) == ['combined', *ATTACKS]
  for t in result['tests'].values():
    assert 0.0 <= t['p_value'] <= 1.0 and (t['n_suspect'], t['n_reference']) == (5, 26)
    assert t['method'] == 'exact'
  # 32 members / 32 non-members, calibration fraction 0.2: the default combiner is standardized
  # on the reference's 6 and reads no member; the held-out 26 + 26 are the pools; non-member sets
  # of size n are tested against the other 26 - n.
  comb = result['combiner']
  assert (comb['kind'], comb['uses_member_labels']) == ('zsum', False)
  assert comb['fit'] == {'n_members': 0, 'n_nonmembers': 6}
  assert comb['weights'] == dict.fromkeys(ATTACKS, 1.0)
  assert 'no member label' in comb['standardized_by']
  assert result['reference'] == {
    'source': "the split's non-members",
    'n_test': 26,
    'n_fit': 6,
    'n_heldout': 26,
  }
  assert result['power']['pools'] == {'members': 26, 'reference': 26}
  assert result['power']['nonmembers']['sizes'] == [1, 2, 5]
  assert result['verdict'] == result['tests']['combined']['verdict']
  html = open(f'{wd}/report.html').read()
  assert 'Dataset inference' in html and 'Power curve' in html and 'power curve' in html
  assert 'Per-image calibration' in html and 'Combiner: zsum, no member labels' in html
  assert 'using no member labels' in html  # the verdict at the top
  summary = DI.format_summary(result)
  assert 'combiner: sum of the attacks' in summary and 'uses no member labels' in summary
  assert 'cannot show FPR <= alpha even with no rejection: it needs 368' in summary
  # The member-label combiner, an option: fitted on the 6 calibration members too. A set of the
  # same name and another combiner is other inputs; under its own name it is kept beside.
  c = _config(suspect='members', size=5, combiner='member_labels')
  with pytest.raises(store.AuditConfigMismatch, match=r"other inputs \(combiner: 'zsum' -> 'mem"):
    pipeline.run(c, wd, 'dataset')
  c.dataset.name = 'members-5-labels'
  labels = pipeline.run(c, wd, 'dataset')
  comb = labels['combiner']
  assert (comb['kind'], comb['uses_member_labels']) == ('member_labels', True)
  assert comb['fit']['n_members'] == comb['fit']['n_nonmembers'] == 6 and comb['l2'] == 0.01
  assert "the split's members (their member labels)" in comb['fit']['images']
  assert labels['tests']['drc'] == result['tests']['drc']  # the attacks' own tests: the same
  assert 'USES MEMBER LABELS' in DI.format_summary(labels)
  assert 'Combiner: member_labels, uses member labels' in open(f'{wd}/report.html').read()
  # A set.json of an earlier drc_jax (no combiner field) was combined with member labels.
  path = suspects.set_dir(wd, 'members-5-labels') / suspects.SET_JSON
  old = json.loads(path.read_text())
  del old['combiner']
  path.write_text(json.dumps(old))
  assert pipeline.run(c, wd, 'dataset')['tests'] == labels['tests']
  shutil.rmtree(suspects.set_dir(wd, 'members-5-labels'))
  m = json.loads(open(f'{wd}/metrics.json').read())
  for name in ATTACKS:
    cal = m[name]['per_image_calibration']
    assert cal['n_members'] == cal['n_nonmembers'] == 26 and cal['fit']['n_nonmembers'] == 6
    assert set(cal['raw']) >= {'auc', 'tpr_at_1pct_fpr', 'tpr_at_0p1pct_fpr'}
  # Non-member suspects leave the reference: 26 - 5 references in the test. A set of another
  # name is kept beside the first.
  result = pipeline.run(_config(suspect='nonmembers', size=5), wd, 'dataset')
  assert result['tests']['combined']['n_reference'] == 21 and written == []
  assert result['name'] == 'nonmembers-5'
  _check_evidence(wd, result, 1)
  kept = suspects.read_results(wd, store.recorded_fingerprint(wd))
  assert [r['name'] for r in kept] == ['members-5', 'nonmembers-5']
  with pytest.raises(validate.ConfigError, match='config.dataset.size: 27 images'):
    pipeline.run(_config(suspect='members', size=27), wd, 'dataset')
  # --mode=report redraws from what was saved, the dataset section included, whatever the config
  # says; --mode=audit with calibration 'none' recomputes the results from the same scores
  # without the per-image calibration.
  c = _config()
  c.audit.calibration = 'none'
  assert pipeline.run(c, wd, 'report') == json.loads(open(f'{wd}/metrics.json').read())
  assert 'Per-image calibration' in open(f'{wd}/report.html').read()
  m = pipeline.run(c, wd, 'audit')
  assert all('per_image_calibration' not in m[name] for name in ATTACKS) and written == []
  html = open(f'{wd}/report.html').read()
  assert 'Dataset inference' in html and 'Per-image calibration' not in html


def test_mode_dataset_scores_a_suspect_folder_once(audited, tmp_path, monkeypatch):
  wd = _copy(audited, tmp_path)
  table = store.load_scores(wd)
  members = table['split'] == 1
  member_heldout, _ = metrics.calibration_split(32, 32, fraction=0.2, seed=0)
  rows = np.flatnonzero(members)[member_heldout][:6]
  folder = tmp_path / 'suspects'
  folder.mkdir()
  raw, _ = D.FashionMnistSource('train').read(table['index'][rows])
  for i, im in enumerate(raw):  # the dataset's own 28x28 files, as a user would have them
    Image.fromarray(im[..., 0]).save(folder / f'img_{i:02d}.png')
  written = _count_writes(monkeypatch)
  c = _config(suspect_dir=str(folder))
  result = pipeline.run(c, wd, 'dataset')
  assert [n for _, n in written] == [6]  # only the folder: one shard of its 6 images
  assert written[0][0].endswith(
    os.path.join('dataset', 'suspects', 'suspects', 'scores', 'shard_00000.npz')
  )
  assert result['suspect']['n'] == 6 and result['tests']['combined']['n_reference'] == 26
  scored = store.load_scores(f'{wd}/dataset/suspects/suspects')
  assert scored['split'].tolist() == [-1] * 6
  for name in DETERMINISTIC:  # the folder images are the split's: the same scores up to float32
    # rounding at another batch position (SecMI's small difference of DDIM states: about 1e-4)
    np.testing.assert_allclose(scored[f'score/{name}'], table[f'score/{name}'][rows], rtol=1e-3)
  assert not np.allclose(scored['score/loss'], table['score/loss'][rows])  # their own noise keys
  again = pipeline.run(c, wd, 'dataset')  # resumes: nothing scored again, same answer
  assert len(written) == 1 and again['tests'] == result['tests']
  Image.fromarray(raw[0, ..., 0]).save(folder / 'img_99.png')  # the folder changed
  with pytest.raises(
    store.AuditConfigMismatch, match=r"set named 'suspects' of other inputs \(suspect.num_images"
  ):
    pipeline.run(c, wd, 'dataset')
  result = pipeline.run(c, wd, 'dataset', overwrite=True)
  assert result['suspect']['n'] == 7 and [n for _, n in written] == [6, 7]
  # Reference images identical (SHA-256) to a suspect image leave the test reference: a reference
  # folder of two suspect images and eight held-out non-members.
  ref = tmp_path / 'reference'
  ref.mkdir()
  for i in range(2):
    shutil.copy(folder / f'img_{i:02d}.png', ref / f'a_suspect_{i}.png')
  non_rows = np.flatnonzero(~members)[:8]
  for i, im in enumerate(D.FashionMnistSource('train').read(table['index'][non_rows])[0]):
    Image.fromarray(im[..., 0]).save(ref / f'b_other_{i}.png')
  c = _config(suspect_dir=str(folder), reference_dir=str(ref))
  with pytest.raises(store.AuditConfigMismatch, match=r'other inputs \(reference.folder: None'):
    pipeline.run(c, wd, 'dataset')  # the set 'suspects' was tested against the split
  c.dataset.name = 'against-a-folder'
  result = pipeline.run(c, wd, 'dataset')
  _, ref_heldout = metrics.calibration_split(32, 10, fraction=0.2, seed=0)
  dropped = int(ref_heldout[:2].sum())  # the two copies sort first
  assert result['reference']['source'].startswith('folder ')
  assert result['suspect']['reference_images_dropped_as_identical'] == dropped
  assert result['reference']['n_test'] == int(ref_heldout.sum()) - dropped
  assert store.load_scores(f'{wd}/dataset/reference')['split'].tolist() == [0] * 10


def _tree(wd) -> dict[str, bytes]:
  return {str(p.relative_to(wd)): p.read_bytes() for p in Path(wd).rglob('*') if p.is_file()}


def _sha256_tree(wd) -> dict[str, str]:
  """Every file under the workdir (the lock file aside) with the SHA-256 of its bytes."""
  return {
    k: hashlib.sha256(v).hexdigest() for k, v in _tree(wd).items() if '.drc_jax.lock' not in k
  }


def test_many_suspect_sets_keep_their_results_and_a_bad_one_changes_nothing(
  audited, tmp_path, monkeypatch
):
  wd = _copy(audited, tmp_path)
  raw, _ = D.FashionMnistSource('train').read(np.arange(6))

  def folder(name, images):
    f = tmp_path / name
    f.mkdir()
    for i, im in enumerate(images):
      Image.fromarray(im).save(f / f'{name}_{i}.png')
    return str(f)

  # Two folders in one workdir: the second needs no --overwrite and both keep their results.
  first = folder('first', raw[:3, ..., 0])
  one = pipeline.run(_config(suspect_dir=first), wd, 'dataset')
  two = pipeline.run(_config(suspect_dir=folder('second', raw[3:5, ..., 0])), wd, 'dataset')
  assert (one['name'], two['name']) == ('first', 'second')
  assert (one['suspect']['n'], two['suspect']['n']) == (3, 2)
  _check_evidence(wd, one, 1)
  kept = suspects.read_results(wd, store.recorded_fingerprint(wd))
  assert [r['name'] for r in kept] == ['first', 'second']
  for r, want in zip(kept, (one, two)):
    assert r['tests'] == want['tests'] and r['verdict'] == want['verdict']
  assert not Path(wd, store.SUPERSEDED_DIR).exists()

  def report_shows_both():
    page = open(f'{wd}/report.html').read()
    verdict = page[page.index('id="verdict"') : page.index('</section>')]
    for name in ('first (3 images)', 'second (2 images)'):
      assert f'Suspect set {name}' in verdict
    for name in ('first', 'second'):
      assert f'<h3>Suspect set {name}</h3>' in page
    assert page.count('<h4>Strongest suspects</h4>') == 2 and 'first_' in page

  report_shows_both()
  pipeline.run(_config(), wd, 'report')  # the redraw from the workdir alone shows them too
  report_shows_both()

  # A third folder under the name of an existing set, with --overwrite, fails its checks before
  # any file moves: not one byte of the workdir changes.
  before = _sha256_tree(wd)
  rgb = np.repeat(raw[5], 3, axis=-1)
  mixed = folder('mixed', [raw[0, ..., 0], raw[1, ..., 0], rgb])  # the RGB file in batch 2
  monkeypatch.setattr(suspects, '_HASH_BATCH', 2)
  with pytest.raises(D.DataError, match=r'mixed_2.png is RGB but .*mixed_0.png is grayscale'):
    pipeline.run(_config(suspect_dir=mixed, name='first'), wd, 'dataset', True)
  with pytest.raises(D.DataError, match=r'color: its images have 3 channel\(s\) but config.data'):
    pipeline.run(
      _config(suspect_dir=folder('color', [rgb, rgb]), name='first'), wd, 'dataset', True
    )
  broken = folder('broken', raw[:2, ..., 0])
  Path(broken, 'broken_1.png').write_bytes(b'\x89PNG not an image')
  with pytest.raises(D.DataError, match=r'broken_1.png: unreadable or corrupt image'):
    pipeline.run(_config(suspect_dir=broken, name='first'), wd, 'dataset', True)
  with pytest.raises(validate.ConfigError, match=r"config.dataset.name: '\.\./first' is not"):
    pipeline.run(_config(suspect_dir=first, name='../first'), wd, 'dataset', True)
  with pytest.raises(validate.ConfigError, match=r"config.dataset.name: 'my set' \(the name of"):
    pipeline.run(_config(suspect_dir=folder('my set', raw[:2, ..., 0])), wd, 'dataset', True)
  # A valid folder under a taken name: refused without --overwrite, nothing moved.
  third = folder('third', raw[2:4, ..., 0])
  with pytest.raises(store.AuditConfigMismatch, match=r"suspect set named 'first' of other"):
    pipeline.run(_config(suspect_dir=third, name='first'), wd, 'dataset')
  assert _sha256_tree(wd) == before

  # With --overwrite, only that set's files move aside; the other set is untouched.
  three = pipeline.run(_config(suspect_dir=third, name='first'), wd, 'dataset', True)
  assert three['suspect']['n'] == 2 and three['suspect']['source'] == f'folder {third}'
  (moved,) = Path(wd, store.SUPERSEDED_DIR).glob('*/dataset/suspects/first')
  after = _sha256_tree(wd)
  prefix = f'{store.SUPERSEDED_DIR}/{moved.parent.parent.parent.name}/'
  assert {k[len(prefix) :]: v for k, v in after.items() if k.startswith(prefix)} == {
    k: v for k, v in before.items() if k.startswith('dataset/suspects/first/')
  }
  for k, v in before.items():  # the other set, and the shared files of the audit, as they were
    if k.startswith(('dataset/suspects/second/', 'scores/', 'split.json', 'audit_config.json')):
      assert after[k] == v, k
  assert json.loads((moved / suspects.SET_JSON).read_text())['suspect']['folder'] == first
  kept = suspects.read_results(wd, store.recorded_fingerprint(wd))
  assert [(r['name'], r['suspect']['n']) for r in kept] == [('first', 2), ('second', 2)]


def test_a_damaged_dataset_json_and_a_one_image_reference_are_one_line(audited, tmp_path):
  wd = _copy(audited, tmp_path)
  # The one set of an earlier drc_jax (W/dataset.json) is read as a set named after its source,
  # and only a new set of that name would move it aside.
  fp = store.recorded_fingerprint(wd)
  legacy = {
    'suspect': {'source': 'folder /data/old-set', 'n': 3},
    'config': {'suspect_dir': '/data/old-set', 'suspect': ''},
    'fingerprint': fp,
  }
  Path(wd, store.DATASET_JSON).write_text(json.dumps(legacy))
  (got,) = suspects.read_results(wd, fp)
  assert got['name'] == 'old-set' and got['evidence'] == []
  assert suspects.read_results(wd, {'another': 'audit'}) == []
  changes, paths = suspects.set_changes(wd, {'name': 'old-set'})
  assert [str(p) for p in paths] == [str(Path(wd, store.DATASET_JSON))]
  assert 'the one set of an earlier drc_jax' in changes[0]
  assert suspects.set_changes(wd, {'name': 'new-set'}) == ([], [])
  assert suspects.legacy_name({'config': {'suspect': 'members', 'size': 50}}) == 'members-50'
  # A set whose panels cannot be read is a one-line error naming the file; a set of other scores
  # is left out unread.
  broken = suspects.set_dir(wd, 'broken')
  broken.mkdir(parents=True)
  (broken / suspects.RESULT_JSON).write_text(json.dumps({'fingerprint': fp, 'evidence': [{}]}))
  (broken / suspects.EVIDENCE_NPZ).write_bytes(b'PK not a zip')
  with pytest.raises(errors.WorkdirError, match=r'broken/evidence.npz: unreadable .*rerun --mode'):
    suspects.read_results(wd, fp)
  assert [r['name'] for r in suspects.read_results(wd, {'another': 'audit'})] == []
  Path(wd, store.DATASET_JSON).write_text('{"tests": ')
  with pytest.raises(errors.WorkdirError, match=r'dataset.json: not valid JSON .*rerun --mode'):
    suspects.read_results(wd, None)
  ref = tmp_path / 'ref'
  ref.mkdir()
  raw, _ = D.FashionMnistSource('train').read(np.arange(1))
  Image.fromarray(raw[0, ..., 0]).save(ref / 'only.png')
  with pytest.raises(D.DataError, match=r'ref: 1 image; config.dataset.reference_dir needs'):
    pipeline.run(_config(suspect='members', size=5, reference_dir=str(ref)), wd, 'dataset')
