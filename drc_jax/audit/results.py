"""The results of an audit from its saved scores: metrics with intervals and the calibrated
decision, per-image calibration, DRC's votes, the evidence panels, the target's samples and the
report. Programs it runs (DRC evidence, sampling) come jitted from the audit's ``Scorer``.
"""

from __future__ import annotations

import io
import json

import numpy as np
from absl import logging
from etils import epath

from drc_jax.audit import calibration as calibration_lib
from drc_jax.audit import controls, store
from drc_jax.audit import generated as generated_lib
from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import report as report_lib
from drc_jax.audit import samples as samples_lib
from drc_jax.audit import suspects as suspects_lib
from drc_jax.core import errors, fileio, parallel, progress, records, streams
from drc_jax.data import captions as captions_lib
from drc_jax.data import sources as data_lib
from drc_jax.drc import scorer as drc_lib


def _json_safe(d):
  return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


def heldout_rows(config, table: dict[str, np.ndarray]) -> np.ndarray:
  """bool [rows]: the held-out images of an audit table (``metrics.calibration_split``; the
  calibration part fits thresholds and calibration and chose DRC's protocol)."""
  members = np.asarray(table['split']) == 1
  member_heldout, nonmember_heldout = metrics_lib.calibration_split(
    int(members.sum()),
    int((~members).sum()),
    fraction=config.audit.calibration_fraction,
    seed=config.seed,
  )
  rows = np.zeros(len(members), bool)
  rows[np.flatnonzero(members)[member_heldout]] = True
  rows[np.flatnonzero(~members)[nonmember_heldout]] = True
  return rows


def compute_metrics(
  config, table: dict[str, np.ndarray], nfe: dict[str, int], access: dict[str, str] | None = None
) -> dict:
  """Per attack: threshold-free metrics with bootstrap CIs on the held-out images (``scope``
  'heldout'; the same on every image under ``all_images``), and the calibrated decision."""
  members = table['split'] == 1
  heldout = heldout_rows(config, table)
  out = {}
  for key in sorted(k for k in table if k.startswith('score/')):
    name = key[len('score/') :]
    s = table[key]
    m = metrics_lib.attack_metrics(
      s[members & heldout],
      s[~members & heldout],
      bootstrap=config.audit.bootstrap,
      seed=config.seed,
    )
    m['scope'] = 'heldout'
    m['all_images'] = metrics_lib.attack_metrics(
      s[members], s[~members], bootstrap=config.audit.bootstrap, seed=config.seed
    )
    cal = metrics_lib.calibrate(
      s[members], s[~members], fraction=config.audit.calibration_fraction, seed=config.seed
    )
    cal.pop('member_heldout'), cal.pop('nonmember_heldout')
    m['calibrated'] = cal
    m['nfe_per_image'] = m['model_calls'] = nfe.get(name)
    m['access'] = (access or {}).get(name)
    out[name] = m
  return _json_safe(out)


def apply_drc_rule(config, table) -> dict | None:
  """DRC's audited score from its saved similarities (``drc/sim`` [N, K]), in place.

  The vote threshold is the ``drc.vote_quantile`` quantile of the calibration non-members'
  similarities (every restoration pooled; nothing held-out is used). ``score/drc`` becomes
  ``drc.aggregate`` of the similarities under ``config.drc.aggregation`` (the shards keep the mean)
  and ``drc/votes`` each image's votes at that threshold. Returns the rule and the agree curve on
  the held-out images (``metrics['drc']['agree']``), None without DRC similarities.
  """
  if 'drc/sim' not in table:
    return None
  sims, members = np.asarray(table['drc/sim'], np.float64), table['split'] == 1
  heldout = heldout_rows(config, table)
  how = config.drc.get('aggregation', 'mean')
  threshold = drc_lib.vote_threshold(sims[~members & ~heldout], config.drc.vote_quantile)
  table['score/drc'] = drc_lib.aggregate(sims, how, threshold)
  votes = drc_lib.votes(sims, threshold)
  table['drc/votes'] = votes
  agree = metrics_lib.agree_curve(
    votes[members & heldout], votes[~members & heldout], sims.shape[1]
  )
  agree['threshold'] = threshold
  agree['threshold_fit_on'] = 'calibration non-members'
  agree['scope'] = 'heldout'
  return _json_safe(
    {
      'aggregation': how,
      'vote_threshold': threshold,
      'vote_quantile': float(config.drc.vote_quantile),
      'protocol': drc_lib.describe(config.drc, config.get('text')),
      'agree': agree,
    }
  )


def _pick_evidence(table, metrics, n: int) -> list[tuple[str, int]]:
  """Rows for the panels: highest, lowest and borderline (nearest the calibrated threshold)."""
  s = (
    table['score/drc']
    if 'score/drc' in table
    else table[sorted(k for k in table if k.startswith('score/'))[0]]
  )
  order = np.argsort(-s, kind='stable')
  name = 'drc' if 'score/drc' in table else sorted(metrics)[0]
  thr = metrics[name]['calibrated']['threshold']
  border = np.argsort(np.abs(s - thr), kind='stable')
  return (
    [('highest', int(r)) for r in order[:n]]
    + [('lowest', int(r)) for r in order[::-1][:n]]
    + [('borderline', int(r)) for r in border[:n]]
  )


def write_results(config, workdir: str, scorer, source: data_lib.ImageSource) -> dict:
  """metrics.json, the plots, the evidence panels and report.html from the saved scores.

  ``scorer``: the run's ``audit.Scorer`` (the target and its jitted programs).
  """
  target, attacks = scorer.target, scorer.attacks
  store.check_scores_match(config, workdir, target)
  table = store.load_scores(workdir, store.fingerprint_digest(store.fingerprint(config, target)))
  drc_rule = apply_drc_rule(config, table)  # DRC's score under drc.aggregation
  # The images are read once: the blind baseline's features start with per-image calibration's.
  blind = calibration_lib.table_features(
    source, table['index'], config.data, controls.blind_features
  )
  calibrated = {}
  if config.audit.calibration == 'quantile':
    features = blind[:, : len(calibration_lib.FEATURES)]
    calibrated = calibration_lib.per_image_calibration(config, table, features)
  # The blind baseline: image statistics only, fit on the calibration part, a control.
  table[f'score/{controls.BLIND}'] = controls.blind_scores(
    blind, table['split'] == 1, ~heldout_rows(config, table)
  )
  nfe = {n: a.nfe for n, a in attacks.items()} | {controls.BLIND: 0}
  access = {n: a.access for n, a in attacks.items()} | {controls.BLIND: 'none'}
  metrics = compute_metrics(config, table, nfe, access)
  for name, entry in calibrated.items():
    metrics[name]['per_image_calibration'] = _json_safe(entry)
  warning = controls.shift_warning(metrics[controls.BLIND])
  if warning:
    logging.warning('%s', warning)
    for m in metrics.values():
      m['warnings'].insert(0, warning)
  agree = None
  if drc_rule is not None:
    metrics['drc'].update(drc_rule)
    agree = drc_rule['agree']
  if scorer.evidence_fn is not None:
    evidence = _evidence(config, table, metrics, scorer, source)
  else:
    evidence = []
  sample_info = _samples(config, workdir, table, scorer, source)
  if sample_info is not None:
    # The generated-image control: the samples scored by every attack, as known non-members.
    digest = store.fingerprint_digest(store.fingerprint(config, target))
    gen_scores = generated_lib.load_or_score(
      config, workdir, scorer, sample_info['samples'], digest, sample_info['prompts']
    )
    for name, entry in generated_lib.control(metrics, gen_scores).items():
      metrics[name]['generated'] = _json_safe(entry)
  if parallel.is_writer():
    fileio.atomic_write_text(
      epath.Path(workdir) / 'metrics.json', json.dumps(metrics, indent=1, sort_keys=True)
    )
    summary = (
      f'target: {target.path} (step {target.step}, EMA SHA-256 '
      f'{target.ema_sha256[:16]})\n'
      f'data: {source.name} '
      f'{config.data.resolution}x{config.data.resolution}x{config.data.channels}\n'
      f'members: {int(np.sum(table["split"] == 1))}, non-members: '
      f'{int(np.sum(table["split"] == 0))}\n'
      f'{drc_lib.describe(config.drc, config.get("text"))}'
    )
    if sample_info is not None:
      fileio.atomic_write_text(
        epath.Path(workdir) / 'samples.json',
        json.dumps(sample_info['figures'], indent=1, sort_keys=True),
      )
    inputs = {
      'table': table,
      'evidence': evidence,
      'config_summary': summary,
      'agree': agree,
      'samples': sample_info,
      'heldout': heldout_rows(config, table),
      'smoke': bool(config.get('smoke_run', False)),
    }
    save_report_inputs(workdir, **inputs)
    datasets = suspects_lib.read_results(workdir, store.fingerprint(config, target))
    report_lib.write_report(workdir, metrics=metrics, datasets=datasets, **inputs)
  parallel.sync('report_written')
  return metrics


# ----------------------------------------------------------------------------------------------
# What the report is drawn from, kept so that --mode=report redraws it from the workdir alone.

REPORT_INPUTS_NPZ = 'report/inputs.npz'
REPORT_INPUTS_JSON = 'report/inputs.json'
_EVIDENCE_ARRAYS = ('original', 'degraded', 'restored', 'restorations')
_SAMPLE_ARRAYS = ('samples', 'nearest', 'nearest_pos', 'nearest_distance', 'is_copy')


def save_report_inputs(
  workdir: str, *, table, evidence, config_summary, agree, samples, heldout, smoke=False
) -> None:
  """Writes what ``report.write_report`` draws (besides ``metrics.json`` and the suspect sets)
  to ``W/report/inputs.{npz,json}``: the score table with its derived columns, the evidence
  images, the target's samples and their nearest members, the held-out rows."""
  arrays = {f'table/{k}': np.asarray(v) for k, v in table.items()}
  arrays['heldout'] = np.asarray(heldout, bool)
  meta: dict = {
    'config_summary': config_summary,
    'agree': agree,
    'evidence': [],
    'smoke': bool(smoke),
  }
  for i, item in enumerate(evidence):
    meta['evidence'].append({k: v for k, v in item.items() if k not in _EVIDENCE_ARRAYS})
    for k in _EVIDENCE_ARRAYS:
      arrays[f'evidence/{i}/{k}'] = np.asarray(item[k])
  if samples is not None:
    meta['samples'] = {'figures': samples['figures']}
    for k in _SAMPLE_ARRAYS + ('nearest_index',):
      arrays[f'samples/{k}'] = np.asarray(samples[k])
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  report_dir = epath.Path(workdir) / 'report'
  report_dir.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_bytes(epath.Path(workdir) / REPORT_INPUTS_NPZ, buf.getvalue())
  fileio.atomic_write_text(
    epath.Path(workdir) / REPORT_INPUTS_JSON, json.dumps(_json_safe(meta), indent=1)
  )


def load_report_inputs(workdir: str) -> dict:
  """The inputs ``save_report_inputs`` wrote (``write_report``'s keyword arguments)."""
  wd = epath.Path(workdir)
  npz, meta_path = wd / REPORT_INPUTS_NPZ, wd / REPORT_INPUTS_JSON
  if not npz.exists() or not meta_path.exists():
    raise errors.WorkdirError(
      f'{workdir} holds no saved report inputs ({REPORT_INPUTS_NPZ}): run --mode=audit with the '
      f"audit's config first (it reuses every saved score and rewrites the results)"
    )
  meta = records.read_json(
    meta_path, errors.WorkdirError, '; run --mode=audit to write it again (no score is redrawn)'
  )
  try:
    with npz.open('rb') as f:
      z = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(
      f'{npz}: unreadable ({e}); run --mode=audit to write it again (no score is redrawn)'
    ) from e
  evidence = [
    {**item, **{k: z[f'evidence/{i}/{k}'] for k in _EVIDENCE_ARRAYS}}
    for i, item in enumerate(meta['evidence'])
  ]
  samples = None
  if 'samples' in meta:
    samples = {k: z[f'samples/{k}'] for k in _SAMPLE_ARRAYS + ('nearest_index',)}
    samples['figures'] = meta['samples']['figures']
  return {
    'table': {k[len('table/') :]: v for k, v in z.items() if k.startswith('table/')},
    'evidence': evidence,
    'config_summary': meta['config_summary'],
    'agree': meta['agree'],
    'samples': samples,
    'heldout': z['heldout'],
    'smoke': bool(meta.get('smoke', False)),
  }


def redraw(workdir: str) -> dict:
  """``report.html`` again from what the audit saved (``metrics.json``, the report inputs, every
  suspect set of the same scores with its evidence panels): no config, no model, nothing
  recomputed. Returns metrics."""
  wd = epath.Path(workdir)
  store.check_saved_results(workdir)  # the scores and target the page describes are still there
  metrics_path = wd / 'metrics.json'
  if not metrics_path.exists():
    raise errors.WorkdirError(f'{workdir}: no metrics.json; run --mode=audit first')
  metrics = records.read_json(
    metrics_path, errors.WorkdirError, '; run --mode=audit to write it again'
  )
  inputs = load_report_inputs(workdir)
  datasets = suspects_lib.read_results(workdir, store.recorded_fingerprint(workdir))
  if parallel.is_writer():
    report_lib.write_report(workdir, metrics=metrics, datasets=datasets, **inputs)
  return metrics


def _samples(config, workdir: str, table, scorer, source) -> dict | None:
  """The target's samples against its members and real non-members (``drc_jax.audit.samples``)."""
  num = int(config.audit.num_samples)
  if num <= 0:
    return None
  member_idx = table['index'][table['split'] == 1]
  heldout = heldout_rows(config, table)
  non = table['split'] == 0
  members, _, _ = data_lib.load_images(source, member_idx, config.data)
  # The calibration part's non-members set the near-copy threshold; the held-out ones are its
  # floor and the real set of precision / recall.
  calibration, _, _ = data_lib.load_images(source, table['index'][non & ~heldout], config.data)
  nonmembers, _, _ = data_lib.load_images(source, table['index'][non & heldout], config.data)
  prompts = None
  if scorer.target.is_text_conditioned:  # sampled under the held-out non-members' captions
    heldout_captions = captions_lib.Captions(config)(source, table['index'][non & heldout])
    prompts = samples_lib.sample_prompts(heldout_captions, num)
  info = samples_lib.load_or_generate(
    workdir,
    scorer.target,
    members,
    nonmembers,
    calibration,
    sample_fn=scorer.sample_fn,
    num=num,
    seed=config.seed,
    batch_size=config.audit.batch_size,
    prompts=prompts,
  )
  info['nearest_index'] = member_idx[info['nearest_pos']]  # dataset index of each nearest member
  return info


def median_restoration(sims) -> int:
  """The restoration a panel shows: the one whose similarity is the image's median (the lower
  middle one for even K), the typical restoration, not a lucky or unlucky one."""
  return int(np.argsort(np.asarray(sims), kind='stable')[(len(sims) - 1) // 2])


def panel_fields(config, score, nonmember_scores, threshold, original, degraded, restored, sims):
  """The fields every evidence panel has: its DRC score, that score's percentile among
  ``nonmember_scores`` and the decision at ``threshold``, the original, the median restoration
  (degraded and restored) and all K restorations with their similarities ``sims`` [K]."""
  sims = np.asarray(sims, np.float64)
  k_med = median_restoration(sims)
  return {
    'score': float(score),
    'percentile': float(metrics_lib.percentile_among([score], nonmember_scores)[0]),
    'decision': 'member' if score >= threshold else 'non-member',
    'original': original,
    'degraded': degraded[k_med],
    'restored': restored[k_med],
    'shown_restoration': k_med,
    'restorations': restored,
    'similarities': sims.tolist(),
    'comparator': config.drc.comparator,
  }


def drc_panels(config, scorer, source, indices, key_indices):
  """DRC's restorations of images ``indices`` of ``source``, recomputed exactly with the keys
  their scores were drawn with (derived from ``key_indices``, as ``scoring.score_images`` did).

  Returns:
    (originals [n, H, W, C], degraded [n, K, H, W, C], restored [n, K, H, W, C]).
  """
  mesh, params = scorer.mesh, scorer.target.params
  bs, n = config.audit.batch_size, len(indices)
  indices, key_indices = np.asarray(indices), np.asarray(key_indices)
  pad = np.resize(np.arange(n), -(-n // bs) * bs)  # fixed batch shape: one compiled program
  originals, degraded, restored = [], [], []
  bar = progress.Progress('restoring the evidence panels', n, 'images')
  for lo in range(0, len(pad), bs):
    pos = pad[lo : lo + bs]
    images, _, _ = data_lib.load_images(source, indices[pos], config.data)
    originals.append(images)
    keys = drc_lib.image_keys(config.seed, streams.ATTACKS['drc'], key_indices[pos])
    side, _ = scorer.side_fn(source, indices[pos])
    d, r = scorer.evidence_fn(
      params,
      parallel.shard_batch(mesh, keys),
      parallel.shard_batch(mesh, images),
      scorer.aux.get('drc'),
      {k: parallel.shard_batch(mesh, v) for k, v in side.items()},
    )
    degraded.append(parallel.to_host(d))
    restored.append(parallel.to_host(r))
    bar.update(min(bs, n - lo))
  bar.close()
  # the images just restored: read once
  return tuple(np.concatenate(x)[:n] for x in (originals, degraded, restored))


def _evidence(config, table, metrics, scorer, source: data_lib.ImageSource) -> list[dict]:
  """Recomputes the DRC evidence (exact: keys are per image) for the selected rows."""
  picks = _pick_evidence(table, metrics, config.audit.num_evidence)
  idx = table['index'][np.asarray([r for _, r in picks])]
  originals, degraded, restored = drc_panels(config, scorer, source, idx, idx)
  s = table['score/drc']
  non = s[table['split'] == 0]
  thr = metrics['drc']['calibrated']['threshold']
  out = []
  for j, (kind, r) in enumerate(picks):
    out.append(
      {
        'kind': kind,
        'index': int(table['index'][r]),
        'split': int(table['split'][r]),
        'label_name': data_lib.label_name(source, int(table['label'][r])),
        # all K restorations are shown as thumbnails
        **panel_fields(
          config, s[r], non, thr, originals[j], degraded[j], restored[j], table['drc/sim'][r]
        ),
      }
    )
  return out


def strongest_suspects(
  config, scorer, images: suspects_lib.Images, rows, combined, split_table
) -> list[dict]:
  """DRC's panels of the suspects of highest combined score (``audit.num_evidence`` of them),
  recomputed exactly from the keys their scores were drawn with. As in the audit's panels, each
  DRC score's percentile among the audit's non-members and DRC's calibrated decision."""
  n = min(int(config.audit.num_evidence), len(rows))
  if scorer.evidence_fn is None or not n:
    return []
  order = np.argsort(-np.asarray(combined), kind='stable')[:n]
  picked, t = np.asarray(rows)[order], images.table
  idx = np.asarray(t['index'], np.int64)[picked]
  originals, degraded, restored = drc_panels(
    config, scorer, images.source, idx, idx + images.key_offset
  )
  s, members = np.asarray(split_table['score/drc']), np.asarray(split_table['split']) == 1
  a = config.audit
  thr = metrics_lib.calibrate(
    s[members], s[~members], fraction=a.calibration_fraction, seed=config.seed
  )['threshold']
  out = []
  for j, r in enumerate(picked):
    out.append(
      {
        'kind': 'strongest',
        'split': 'suspect',
        'index': int(idx[j]),
        'rank': j + 1,
        'combined': float(combined[order[j]]),
        'file': images.files[idx[j]] if images.files else None,
        'label_name': (
          None if images.files else data_lib.label_name(images.source, int(t['label'][r]))
        ),
        'sha256': str(t['hash'][r]),
        **panel_fields(
          config,
          t['score/drc'][r],
          s[~members],
          thr,
          originals[j],
          degraded[j],
          restored[j],
          t['drc/sim'][r],
        ),
      }
    )
  return out
