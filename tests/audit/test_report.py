"""Tests of drc_jax.audit.report on a synthetic score table."""

import hashlib
import html
import os
import re

import numpy as np
from PIL import Image

from drc_jax.audit import metrics, plots, report, summary

ATTACKS = ('drc', 'loss', 'secmi')
NUM_RESTORATIONS = 3


def _synthetic_table(num_per_split: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  n = 2 * num_per_split
  split = np.repeat(np.array([1, 0], dtype=np.int8), num_per_split)
  table = {
    'split': split,
    'index': np.tile(np.arange(num_per_split, dtype=np.int64), 2),
    'hash': np.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]),
    'label': rng.integers(0, 10, size=n).astype(np.int64),
  }
  for shift, attack in enumerate(ATTACKS):
    table[f'score/{attack}'] = rng.normal(size=n) + 0.5 * (shift + 1) * split
  sim = rng.uniform(size=(n, NUM_RESTORATIONS)) + 0.3 * split[:, None]  # [N, K]
  table['drc/sim'] = sim
  table['drc/votes'] = (sim > 0.6).sum(axis=1)
  return table


def _evidence(table, channels: int) -> list[dict]:
  rng = np.random.default_rng(1)
  scores = table['score/drc']
  nonmember_scores = scores[table['split'] == 0]
  items = []
  for kind, row in (
    ('highest', int(np.argmax(scores))),
    ('lowest', int(np.argmin(scores))),
    ('borderline', 0),
  ):
    original = rng.uniform(-1, 1, size=(28, 28, channels))
    degraded = original.copy()
    degraded[8:20, 8:20] = 0.0
    items.append(
      {
        'kind': kind,
        'index': int(table['index'][row]),
        'split': int(table['split'][row]),
        'score': float(scores[row]),
        'percentile': float(metrics.percentile_among(scores[row], nonmember_scores)[0]),
        'decision': 'member' if scores[row] > 0 else 'non-member',
        'original': original,
        'degraded': degraded,
        'restored': np.clip(original + rng.normal(0, 0.2, original.shape), -1, 1),
      }
    )
  return items


def _metrics(table) -> dict[str, dict]:
  out = {}
  members = table['split'] == 1
  for nfe, attack in zip((250, 1, 12), ATTACKS):
    scores = table[f'score/{attack}']
    out[attack] = metrics.attack_metrics(scores[members], scores[~members], bootstrap=200)
    out[attack]['nfe_per_image'] = nfe
  calibrated = metrics.calibrate(
    table['score/drc'][members], table['score/drc'][~members], fraction=0.5, seed=0
  )
  out['drc']['calibrated'] = calibrated
  return out


def test_write_report_is_self_contained(tmp_path):
  table = _synthetic_table()
  evidence = _evidence(table, channels=3) + _evidence(table, channels=1)[:1]
  html_path = report.write_report(
    str(tmp_path), table, _metrics(table), evidence, config_summary='dataset: <cifar10> & "test"'
  )
  assert html_path == os.path.join(str(tmp_path), 'report.html')
  text = open(html_path, encoding='utf-8').read()
  for attack in ATTACKS:
    assert attack in text
  assert '&lt;cifar10&gt; &amp; &quot;test&quot;' in text  # Config text is escaped.
  sources = re.findall(r'src="([^"]*)"', text)
  assert len(sources) == 4 + len(evidence)  # ROC, log ROC, histograms, agree, panels.
  assert all(src.startswith('data:image/png;base64,') for src in sources)
  assert 'src="http' not in text and 'href=' not in text
  assert str(tmp_path) not in text
  for kind in ('highest', 'lowest', 'borderline'):
    assert f'<h3>{kind}</h3>' in text
  assert 'held-out accuracy' in text
  assert 'TPR@0.1%FPR' in text

  report_dir = tmp_path / 'report'
  pngs = sorted(report_dir.glob('*.png'))
  assert {p.name for p in pngs} >= {'roc.png', 'roc_log.png', 'histograms.png', 'agree.png'}
  assert len(pngs) == 4 + len(evidence)
  for png in pngs:
    with Image.open(png) as image:
      image.verify()
  assert not list(report_dir.glob('*.tmp')) and not list(tmp_path.glob('*.tmp'))


def test_evidence_panel_upscales_small_images(tmp_path):
  table = _synthetic_table(num_per_split=20)
  item = _evidence(table, channels=1)[0]
  item['original'] = item['original'][..., 0]  # [H, W] is accepted too.
  path = plots.evidence_panel(item, str(tmp_path / 'panel.png'))
  with Image.open(path) as image:
    width, height = image.size
  assert width >= 4 * plots.MIN_PANEL_PIXELS and height >= plots.MIN_PANEL_PIXELS


def test_format_metrics_table():
  table = _synthetic_table(num_per_split=100)
  text = summary.format_metrics_table(_metrics(table))
  lines = text.splitlines()
  header = [c.strip() for c in lines[0].split('  ') if c]
  assert header == [
    'attack',
    'AUC [95% CI]',
    'ASR [95% CI]',
    'TPR@1% [95% CI]',
    'TPR@0.1% [95% CI]',
    'NFE',
  ]
  for attack in ATTACKS:
    assert any(line.startswith(attack) for line in lines[2:])
  assert '250' in text
  # 95% intervals in the terminal too.
  drc = next(line for line in lines if line.startswith('drc'))
  m = _metrics(table)['drc']
  assert f'{m["auc"]:.4f} [{m["ci95"]["auc"][0]:.3f}, {m["ci95"]["auc"][1]:.3f}]' in drc
  assert 'AUC [95% CI]' in lines[0]
  # The same low-count note for every attack is printed once, not once per attack.
  notes = [line for line in lines if line.startswith('note')]
  assert notes == ['note (all attacks): ' + w for w in m['warnings']] and len(notes) == 2
  assert 'rests on 0.1 expected false positives' in notes[1]


def test_held_out_figures_have_n_and_intervals(tmp_path):
  table = _synthetic_table()
  html = report._metrics_html(_metrics(table))
  cal = _metrics(table)['drc']['calibrated']
  assert 'held-out TPR [95% CI]' in html and 'held-out n (members / non-members)' in html
  assert f'{cal["n_members"]} / {cal["n_nonmembers"]}' in html
  lo, hi = cal['ci95']['tpr']
  assert f'{100 * lo:.2f}%, {100 * hi:.2f}%' in html


def test_agree_plot_has_a_chance_line(tmp_path, monkeypatch):
  figures = []
  real = plots.save_figure
  monkeypatch.setattr(
    plots, 'save_figure', lambda fig, path: figures.append(fig) or real(fig, path)
  )
  agree = metrics.agree_curve([3, 3, 2, 0], [1, 0, 0, 2, 0, 0, 0, 0], k=3)
  plots.plot_agree(agree, str(tmp_path / 'agree.png'))
  labels = figures[0].axes[0].get_legend_handles_labels()[1]
  assert 'chance precision (33.3% members)' in labels


def test_evidence_caption_names_the_class():
  table = _synthetic_table(num_per_split=20)
  item = dict(_evidence(table, channels=1)[0], label_name='Ankle boot')
  caption = report._evidence_caption(item, table)
  assert ', Ankle boot, sha256 ' in caption and 'label ' not in caption
  item.pop('label_name')
  assert ', label ' in report._evidence_caption(item, table)  # no name known: the number


def test_dataset_and_per_image_calibration_sections(tmp_path):
  from drc_jax.audit import calibration, combiners, dataset_inference
  from drc_jax.core import config_base

  table = _synthetic_table(num_per_split=100)
  m = _metrics(table)
  c = config_base.base_config()
  c.audit.bootstrap = 0
  features = np.random.default_rng(3).normal(size=(200, len(calibration.FEATURES)))
  for name, entry in calibration.per_image_calibration(c, table, features).items():
    m[name]['per_image_calibration'] = entry
  rng = np.random.default_rng(4)
  combiner = combiners.fit_logistic(
    rng.normal(1, 1, (20, 3)), rng.normal(0, 1, (20, 3)), list(ATTACKS)
  )
  dataset = {
    'alpha': 0.01,
    'verdict': 'member data detected (p = 1e-05, alpha = 0.01)',
    'suspect': {'source': 'folder /x', 'n': 30},
    'reference': {'source': 'the split', 'n_test': 80, 'n_fit': 20},
    'combiner': combiners.record(combiner, 20, 20, 'calibration members and reference'),
    'tests': dataset_inference.compare_sets(
      rng.normal(1, 1, (30, 3)), rng.normal(0, 1, (80, 3)), combiner, 0.01
    ),
    'power': dataset_inference.power_curve(
      rng.normal(1, 1, (40, 3)),
      rng.normal(0, 1, (120, 3)),
      combiner,
      sizes=(1, 5, 50),
      repetitions=10,
      alpha=0.01,
      seed=0,
    ),
    'validity': ['The combiner saw only <calibration> images.'],
  }
  strongest = dict(
    _evidence(table, channels=1)[0],
    kind='strongest',
    split='suspect',
    rank=1,
    combined=2.5,
    file='sub/img_07.png',
    sha256='ab' * 32,
  )
  # A set of the label-free default, and one of an earlier drc_jax (a 'logistic' combiner
  # without the flag, the power curve's lower-end check).
  other = dict(
    dataset,
    name='nonmembers-30',
    verdict='no evidence of training use (p = 0.4)',
    evidence=[],
    combiner=combiners.record(
      combiners.fit_zsum(rng.normal(0, 1, (20, 3)), list(ATTACKS)), 0, 20, 'the reference'
    ),
  )
  power = dataset['power']
  old_nonmembers = {
    k: v for k, v in power['nonmembers'].items() if k not in ('fpr_upper', 'fpr_check')
  }
  earlier = dict(
    dataset,
    name='older',
    evidence=[],
    combiner={'kind': 'logistic', 'l2': 0.01, 'weights': {'drc': 1.0}, 'fit': {'n_members': 20}},
    power=dict(power, nonmembers=old_nonmembers),
  )
  datasets = [dict(dataset, name='my_photos', evidence=[strongest]), other, earlier]
  text = open(report.write_report(str(tmp_path), table, m, [], datasets=datasets)).read()
  assert '<h2>Per-image calibration (held-out images)</h2>' in text
  assert 'TPR@1%FPR calibrated' in text
  assert text.count('<h2>Dataset inference</h2>') == 1 and 'member data detected' in text
  # One section per set, each with its power curve; the verdict at the top names both.
  assert text.index('id="verdict"') < text.index('<h3>Suspect set my_photos</h3>')
  assert text.index('<h3>Suspect set my_photos</h3>') < text.index('<h3>Suspect set nonmembers-30')
  verdict = text[: text.index('</section>')]
  assert 'Suspect set my_photos (30 images)' in verdict
  assert 'Suspect set nonmembers-30 (30 images)' in verdict
  assert 'no evidence of training use (p = 0.4)' in text
  assert 'FPR upper bound &lt;= alpha' in text and '&lt;calibration&gt;' in text
  # Each set says which combiner ran and whether it used member labels (the top too).
  assert text.count('Combiner: member_labels, uses member labels') == 1
  assert text.count('Combiner: zsum, no member labels') == 1
  assert text.count('Combiner: logistic, uses member labels') == 1
  assert 'USES MEMBER LABELS' in text and 'uses no member labels' in text
  assert 'combiner using no member labels' in verdict
  assert 'combiner fitted on labelled members' in verdict
  # 10 sets per size cannot show a false-positive rate <= 0.01: said (368 needed), not passed.
  assert text.count('needs 368 (config.dataset.power_repetitions)') == 3
  assert 'too few repetitions' in text and '(earlier check)' in text
  assert (tmp_path / 'report' / 'dataset_00_power.png').exists()
  assert (tmp_path / 'report' / 'dataset_01_power.png').exists()
  # The strongest suspect's panel, in its set's section only, named by its file.
  assert text.count('<h4>Strongest suspects</h4>') == 1
  assert 'strongest: suspect #' in text and 'combined score 2.5 (#1), sub/img_07.png' in text
  assert (tmp_path / 'report' / 'dataset_00_strongest_00.png').exists()
  assert not (tmp_path / 'report' / 'dataset_01_strongest_00.png').exists()
  # Size 50 exceeds the member pool (40), not half the reference pool: non-member sets only.
  assert '<tr><td>50</td><td>-</td>' in text


def _access(m: dict) -> dict:
  for name, access in (('drc', 'black-box'), ('loss', 'gray-box'), ('secmi', 'gray-box')):
    m[name]['access'] = access
    m[name]['model_calls'] = m[name]['nfe_per_image']
  return m


def test_the_verdict_comes_first_and_says_what_detects_membership(tmp_path):
  table = _synthetic_table()
  m = _access(_metrics(table))
  m['blind'] = metrics.attack_metrics(
    np.zeros(50) + np.arange(50) % 7, np.arange(50) % 7 + 0.0, bootstrap=50
  )
  lines = summary.verdict(m)
  assert lines[0].startswith('Membership is detected by 3 of 3 attacks')  # blind is no attack
  assert any(line.startswith('Best with black-box access') and 'drc: AUC' in line for line in lines)
  best_gray = max(('loss', 'secmi'), key=lambda n: m[n]['auc'])
  assert any(
    line.startswith('Best with gray-box') and f'{best_gray}: AUC' in line for line in lines
  )
  assert any(line.startswith('Control: the blind baseline') for line in lines)
  path = report.write_report(str(tmp_path), table, m, _evidence(table, 1), config_summary='x')
  page = open(path).read()
  assert page.index('id="verdict"') < page.index('<h2>Configuration') < page.index('<table>')
  for warning in {w for x in m.values() for w in x['warnings']}:
    assert page.count(html.escape(warning)) == 1, warning  # each warning once, not per row
  assert 'Smoke run' not in page
  page = open(report.write_report(str(tmp_path), table, m, [], smoke=True)).read()
  assert page.index('Smoke run') < page.index('Membership is detected')


def test_the_verdict_names_a_failed_control_and_each_suspect_set():
  table = _synthetic_table()
  m = _access(_metrics(table))
  shift = 'members and non-members differ without the model: the blind baseline ...'
  m['blind'] = {'auc': 0.95, 'ci95': {'auc': [0.9, 0.99]}, 'warnings': [shift]}
  dataset = {
    'alpha': 0.01,
    'primary': 'combined',
    'suspect': {'source': 'my_photos', 'n': 50},
    'tests': {'combined': {'p_value': 1.5e-6, 'reject': True}},
    'combiner': {'kind': 'zsum', 'uses_member_labels': False},
  }
  labels = {'kind': 'member_labels', 'uses_member_labels': True}
  lines = summary.verdict(
    m,
    [
      dataset,
      {**dataset, 'tests': {'combined': {'p_value': 0.4, 'reject': False}}, 'combiner': labels},
    ],
  )
  assert lines[0] == f'The evaluation is not valid as it stands: {shift}.'
  assert not any(line.startswith('Control:') for line in lines)
  assert lines[-2] == (
    'Suspect set my_photos (50 images): detected (p = 1.5e-06, alpha 0.01; combiner using no '
    'member labels).'
  )
  assert lines[-1].startswith('Suspect set my_photos (50 images): no evidence of membership')
  assert lines[-1].endswith('combiner fitted on labelled members).')
  m['drc']['generated'] = {'n': 16, 'fpr': 0.5, 'real_nonmember_fpr': 0.1}
  m['loss']['generated'] = {'n': 16, 'fpr': 0.25, 'real_nonmember_fpr': 0.2}
  line = next(x for x in summary.verdict(m) if x.startswith('Generated images'))
  assert '25%-50%' in line and "drc's (50% against 10%)" in line


def test_evidence_labels_read_as_their_reader_expects():
  assert plots.percentile_text(100.0) == 'above every non-member'
  assert plots.percentile_text(0.0) == 'below every non-member'
  assert plots.percentile_text(87.46) == 'above 87.5% of non-members'
  assert plots.similarity_text(-0.0123, 'masked_mse') == 'MSE 0.0123'
  assert plots.similarity_text(0.91, 'ssim') == 'ssim 0.91'
  item = {'kind': 'highest', 'index': 3, 'split': 1, 'score': -0.01, 'percentile': 100.0}
  title = plots.evidence_title({**item, 'decision': 'member', 'comparator': 'masked_mse'})
  assert 'MSE 0.01' in title and 'th percentile' not in title and '-0.01' not in title


def test_the_power_plot_marks_the_users_set_size(tmp_path):
  power = {
    'alpha': 0.05,
    'repetitions': 20,
    'members': {
      'sizes': [5, 10, 20],
      'combined': {'rate': [0.2, 0.6, 1.0], 'ci95': [[0, 0.4], [0.4, 0.8], [0.8, 1]]},
    },
    'nonmembers': {
      'sizes': [5, 10, 20],
      'combined': {'rate': [0.0, 0.05, 0.0], 'ci95': [[0, 0.2]] * 3},
    },
  }
  calls = {}
  real = plots.save_figure

  def keep(fig, path):
    ax = fig.axes[0]
    calls['ticks'] = [int(t) for t in ax.get_xticks()]
    calls['labels'] = [line.get_label() for line in ax.get_lines()]
    return real(fig, path)

  plots.save_figure = keep
  try:
    plots.plot_power_curve(power, str(tmp_path / 'p.png'), suspect_size=50)
  finally:
    plots.save_figure = real
  assert calls['ticks'] == [5, 10, 20, 50]
  assert 'your set: 50' in calls['labels']
