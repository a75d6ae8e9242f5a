"""Dataset inference: was a *set* of images used to train the target? A one-sided test, a p-value.

One image rarely carries enough evidence; many images together do (dataset inference; CDI,
Dubinski et al., CVPR 2025). ``--mode=dataset`` compares a suspect set with known non-members:

* suspect set: an image folder (``dataset.suspect_dir``), or for experiments ``dataset.size``
  images drawn from the split's held-out members (``dataset.suspect='members'``) or held-out
  reference (``'nonmembers'``);
* reference: known non-members, the split's non-members (default) or the images of
  ``dataset.reference_dir``;
* known members: the split's members.

Every image is scored with every attack by the audit's scorer: the split's images through the
audit's own shards (``W/scores``: images scored by ``--mode=audit`` are not scored again), folder
images into their own resumable shards (a suspect folder's in its set's folder
``W/dataset/suspects/<name>/scores``, a reference folder's in ``W/dataset/reference``, shared).

Who sees what (``metrics.calibration_split``: the audit's calibration fraction, same seed):

* the combiner (``combiners.py``, ``dataset.combiner``) is fitted on the calibration fraction of
  the reference, and on nothing else: by default (``'zsum'``) the sum of the attacks' scores
  standardized by those reference images, which uses no member labels; ``'member_labels'``, a
  logistic regression, also reads the calibration fraction of the target's members (an
  insider's power);
* the test compares the suspect set with the held-out reference, less any image drawn into the
  suspect set and any image identical (SHA-256) to a suspect image;
* the suspect images never fit anything.

So under the null hypothesis "the suspect images are non-members like the reference", suspect and
test-reference scores are exchangeable given the combiner, and the one-sided Mann-Whitney U test
(``stats.mann_whitney_greater``: exact without ties when small enough; with ties exact conditional
on the tied groups, or a permutation p-value; else the normal approximation) has
P(p < alpha) <= alpha. The verdict is the combined test's (one pre-declared test); the per-attack
tests are reported beside it, each at alpha, uncorrected for multiplicity.

The power curve repeats the test on random suspect sets of each size in ``dataset.power_sizes``:
drawn from the held-out members (true-positive rate) and from the held-out reference (false-positive
rate, with the rest of the held-out reference as the test reference), each with a Clopper-Pearson
95% interval; the false-positive rate passes its check only when the interval's upper end is at
most alpha (``stats.false_positive_check``), which needs ``stats.repetitions_to_show(alpha)``
repetitions at least (368 at alpha = 0.01). A random partition of one pool of non-members makes
the exact test exact conditionally on the pool, so each non-member repetition rejects with
probability at most alpha. The repetitions share one pool, so the binomial interval is
approximate.

A workdir keeps any number of suspect sets, each under its name (``suspects.py``): its result
goes to ``W/dataset/suspects/<name>/dataset.json`` with DRC's panels of its strongest suspects;
the report shows a section per set (``report.html``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from absl import logging

from drc_jax.audit import combiners, stats, store, suspects, validate
from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import results as results_lib
from drc_jax.audit import scoring as audit_lib
from drc_jax.core import fileio, parallel, streams

COMBINED = 'combined'
# Attack keys of folder images derive from their position plus an offset per role, so a folder
# image shares no key with a dataset image (indices < 2^31) or with the reference folder (suspect
# folders share one offset: sets are never compared with each other).
FOLDER_KEY_OFFSETS = {'suspect': 2**31, 'reference': 2**31 + 2**30}


# ----------------------------------------------------------------------------------------------
# The test.


def compare_sets(
  suspect, reference, combiner: combiners.Combiner, alpha: float
) -> dict[str, dict[str, Any]]:
  """The one-sided test per attack and on the combined score.

  Args:
    suspect: float [n, A], the suspect images' scores (attack order of ``combiner.names``).
    reference: float [m, A], the test reference's scores.
    combiner: fitted on images disjoint from both.
    alpha: the significance level.

  Returns:
    name ('combined' first, then each attack) -> {``statistic`` (U), ``p_value``, ``method``,
    ``auc`` (U / (n m): P(suspect > reference), ties 1/2), ``rank_biserial`` (2 auc - 1),
    ``glass_delta`` (mean difference over the reference's standard deviation; None if it is 0),
    ``n_suspect``, ``n_reference``, ``reject`` (p < alpha) and ``verdict``}.
  """
  suspect, reference = np.asarray(suspect, np.float64), np.asarray(reference, np.float64)
  columns = [(COMBINED, combiner.score(suspect), combiner.score(reference))]
  columns += [(n, suspect[:, i], reference[:, i]) for i, n in enumerate(combiner.names)]
  out = {}
  for name, s, r in columns:
    t = stats.mann_whitney_greater(s, r)
    sd = float(np.std(r, ddof=1)) if r.size > 1 else 0.0
    out[name] = {
      'statistic': t.u,
      'p_value': t.p_value,
      'method': t.method,
      'auc': t.auc,
      'rank_biserial': 2 * t.auc - 1,
      'glass_delta': float((s.mean() - r.mean()) / sd) if sd > 0 else None,
      'n_suspect': t.n_suspect,
      'n_reference': t.n_reference,
      'reject': bool(t.p_value < alpha),
      'smallest_p_value': smallest_p_value(t.n_suspect, t.n_reference),
      'min_suspects': min_suspects(t.n_reference, alpha),
      'verdict': _verdict(t.p_value, alpha, t.n_suspect, t.n_reference),
    }
  return out


def smallest_p_value(n: int, m: int) -> float:
  """The smallest one-sided Mann-Whitney p-value n suspects can reach against m references: every
  suspect above every reference, 1 / C(n + m, n)."""
  return 1.0 / math.comb(n + m, n)


def min_suspects(m: int, alpha: float) -> int | None:
  """The fewest suspects whose test can reject at ``alpha`` against m references (None: no
  number can, with m = 0)."""
  if m < 1:
    return None
  n = 1
  while smallest_p_value(n, m) >= alpha:
    n += 1
  return n


def _verdict(p: float, alpha: float, n: int, m: int) -> str:
  if smallest_p_value(n, m) >= alpha:
    need = min_suspects(m, alpha)
    return (
      f'cannot reject at this size: {n} suspect image(s) against {m} references reach at '
      f'best p = {smallest_p_value(n, m):.3g}, not below alpha = {alpha:g}; the test needs at '
      f'least {need} suspect images (p = {p:.3g})'
    )
  return (
    'member data detected' if p < alpha else 'no evidence of training use'
  ) + f' (p = {p:.3g}, alpha = {alpha:g})'


def power_curve(
  member_pool,
  reference_pool,
  combiner: combiners.Combiner,
  *,
  sizes,
  repetitions: int,
  alpha: float,
  seed: int,
) -> dict[str, Any]:
  """Rejection rates of the test on random suspect sets of each size.

  For each size n: ``repetitions`` suspect sets of n images drawn without replacement from the
  member pool (tested against the whole reference pool), and as many drawn from the reference
  pool (tested against the rest of it). Sizes above the member pool, or above half the reference
  pool, are skipped.

  Args:
    member_pool: float [P, A], held-out members' scores.
    reference_pool: float [R, A], held-out reference scores.
    combiner: fitted on images outside both pools.
    sizes: suspect sizes.
    repetitions: random sets per size and kind.
    alpha: the significance level.
    seed: seed of the draws.

  Returns:
    {``alpha``, ``repetitions``, ``repetitions_needed`` (the fewest that can show a false-positive
    rate <= alpha: ``stats.repetitions_to_show``), ``interval`` ('Clopper-Pearson 95%'),
    ``pools``, and per kind ('members', 'nonmembers'): ``sizes`` and per test name (combined and
    each attack) ``rejections``, ``rate`` and ``ci95`` (one per size); for 'nonmembers' also, per
    test name and size, ``fpr_upper`` (the interval's upper end), ``within_alpha`` (it is at most
    alpha: the false-positive rate is shown <= alpha) and ``fpr_check`` (``stats.
    false_positive_check``'s status: 'shown', 'not shown', 'too few repetitions', 'exceeds
    alpha')}.
  """
  member_pool = np.asarray(member_pool, np.float64)
  reference_pool = np.asarray(reference_pool, np.float64)
  names = (COMBINED,) + tuple(combiner.names)

  def columns(x):
    return np.concatenate([combiner.score(x)[:, None], x], axis=1)  # [N, 1 + A]

  members, reference = columns(member_pool), columns(reference_pool)
  out: dict[str, Any] = {
    'alpha': float(alpha),
    'repetitions': int(repetitions),
    'repetitions_needed': stats.repetitions_to_show(alpha),
    'interval': 'Clopper-Pearson 95%',
    'seed': int(seed),
    'pools': {'members': len(members), 'reference': len(reference)},
  }
  for kind_id, kind in enumerate(('members', 'nonmembers')):
    limit = len(members) if kind == 'members' else len(reference) // 2
    kept = [int(n) for n in sizes if n <= limit]
    entry: dict[str, Any] = {'sizes': kept, 'skipped_sizes': [int(n) for n in sizes if n > limit]}
    for name in names:
      entry[name] = {'rejections': [], 'rate': [], 'ci95': []}
    for n in kept:
      rng = np.random.default_rng([seed, kind_id, n])
      counts = np.zeros(len(names), np.int64)
      for _ in range(repetitions):
        if kind == 'members':
          s, r = members[rng.choice(len(members), n, replace=False)], reference
        else:
          perm = rng.permutation(len(reference))
          s, r = reference[perm[:n]], reference[perm[n:]]
        for j in range(len(names)):
          counts[j] += stats.mann_whitney_greater(s[:, j], r[:, j]).p_value < alpha
      for j, name in enumerate(names):
        k = int(counts[j])
        entry[name]['rejections'].append(k)
        entry[name]['rate'].append(k / repetitions)
        entry[name]['ci95'].append(list(stats.clopper_pearson(k, repetitions)))
    if kind == 'nonmembers':
      checks = {
        name: [stats.false_positive_check(k, repetitions, alpha) for k in entry[name]['rejections']]
        for name in names
      }
      for field, key in (('fpr_upper', 'upper'), ('within_alpha', 'within_alpha')):
        entry[field] = {name: [c[key] for c in checks[name]] for name in names}
      entry['fpr_check'] = {name: [c['status'] for c in checks[name]] for name in names}
    out[kind] = entry
  return out


# ----------------------------------------------------------------------------------------------
# --mode=dataset.


def _features(table, names) -> np.ndarray:
  return np.stack([np.asarray(table['score/' + n], np.float64) for n in names], axis=1)


def _score_folder(config, root, scorer, folder: suspects.Folder, split_value: int, digest: str):
  """Scores ``folder``'s images into ``root/scores`` (resumable); its score table, in file order."""
  indices = np.arange(len(folder), dtype=np.int64)
  logging.info('%s folder %s: %d images', folder.role, folder.path, len(folder))
  audit_lib.score_images(
    config,
    str(root),
    scorer,
    folder.source,
    np.full(len(folder), split_value, np.int8),
    indices,
    key_indices=indices + FOLDER_KEY_OFFSETS[folder.role],
  )
  return store.load_scores(str(root), digest)


def run(config, workdir: str, overwrite: bool = False) -> dict[str, Any]:
  """``--mode=dataset``: tests one suspect set and keeps it beside the workdir's other sets.

  Every check of the set passes before any file moves: its name, every image of its folder and
  of a reference folder, the size of a draw, a reference left to test against, and a set of the
  same name but other inputs (refused without ``overwrite``). Then ``overwrite`` moves that one
  set aside (and the shared reference scores, for another reference folder), what is missing is
  scored, and the result goes to ``W/dataset/suspects/<name>/dataset.json`` (``suspects.py``).
  Also rewrites ``metrics.json`` and ``report.html`` (a section per set). Returns the result.
  """
  validate.check(config)
  validate.check_dataset(config, require_suspect=True)
  ds, a = config.dataset, config.audit
  name = validate.dataset_name(config)
  # Every image of a folder is read and checked before anything is scored or moves.
  suspect = suspects.open_folder(config, 'suspect', ds.suspect_dir) if ds.suspect_dir else None
  ref_folder = (
    suspects.open_folder(config, 'reference', ds.reference_dir) if ds.reference_dir else None
  )
  scorer, source = audit_lib.score_split(config, workdir, overwrite)
  names = scorer.names
  fp = store.fingerprint(config, scorer.target)
  digest = store.fingerprint_digest(fp)
  table = store.load_scores(workdir, digest)
  is_member = np.asarray(table['split']) == 1
  if ref_folder is not None:
    ref_source, ref_hashes = f'folder {ref_folder.path}', ref_folder.hashes
  else:
    ref_source, ref_hashes = "the split's non-members", np.asarray(table['hash'])[~is_member]
  member_heldout, ref_heldout = metrics_lib.calibration_split(
    int(is_member.sum()), len(ref_hashes), fraction=a.calibration_fraction, seed=config.seed
  )
  ref_pool_hashes = ref_hashes[ref_heldout]
  pick = None
  if suspect is not None:  # reference images identical to a suspect image leave the test
    keep = ~np.isin(ref_pool_hashes, suspect.hashes)
  else:
    pool_size = int(member_heldout.sum()) if ds.suspect == 'members' else len(ref_pool_hashes)
    what = (
      "the split's held-out members"
      if ds.suspect == 'members'
      else f'the held-out part of {ref_source}'
    )
    room = pool_size - (ds.suspect == 'nonmembers')  # non-member draws leave a reference
    if ds.size > room:
      raise validate.ConfigError(
        f'config.dataset.size: {ds.size} images asked of {what}, which can give {room} (its '
        f'calibration fraction fits the combiner and is never drawn); lower it'
      )
    pick = np.random.default_rng([ds.seed, streams.HOST_SUSPECT]).choice(
      pool_size, ds.size, replace=False
    )
    keep = np.ones(len(ref_pool_hashes), bool)
    if ds.suspect == 'nonmembers':
      keep[pick] = False
  if not keep.any():
    raise validate.ConfigError(
      f'config.dataset.reference_dir: no held-out reference image is left for the test (of '
      f'{len(keep)}, {int((~keep).sum())} are suspect images); add known non-members'
    )
  record = suspects.set_record(config, name, fp, suspect, ref_folder)
  changes, moving = suspects.set_changes(workdir, record)
  if changes and not overwrite:
    raise store.AuditConfigMismatch(
      f'{workdir} holds a suspect set named {name!r} of other inputs '
      f'({"; ".join(changes[:4])}). Name this one otherwise (config.dataset.name), or pass '
      f'--overwrite to move that set alone to {workdir}/{store.SUPERSEDED_DIR}/.'
    )
  ref_changes, ref_moving = [], []
  if ref_folder is not None:
    ref_changes, ref_moving = suspects.reference_changes(workdir, ref_folder.record(fp))
  if ref_changes and not overwrite:
    raise store.AuditConfigMismatch(
      f'{suspects.reference_dir(workdir)} holds scores of another config or folder '
      f'(config.dataset.reference_dir; {"; ".join(ref_changes[:4])}). Pass --overwrite to move '
      f'them to {workdir}/{store.SUPERSEDED_DIR}/ (every set keeps its result).'
    )
  parallel.sync('dataset_checked')  # every process has read what is there
  root = suspects.set_dir(workdir, name)
  if parallel.is_writer():
    if moving or ref_moving:
      dest = suspects.move_aside(workdir, moving + ref_moving)
      logging.warning(
        '--overwrite: %s moved to %s (%s)',
        ', '.join(str(p) for p in moving + ref_moving),
        dest,
        '; '.join(changes + ref_changes),
      )
    root.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(root / suspects.SET_JSON, json.dumps(record, indent=1, sort_keys=True))
    if ref_folder is not None:
      suspects.reference_dir(workdir).mkdir(parents=True, exist_ok=True)
      fileio.atomic_write_text(
        suspects.reference_dir(workdir) / suspects.FOLDER_CONFIG,
        json.dumps(ref_folder.record(fp), indent=1, sort_keys=True),
      )
  parallel.sync('dataset_recorded')

  split = suspects.Images(table, source, 0)
  if ref_folder is not None:
    ref_table = _score_folder(
      config, suspects.reference_dir(workdir), scorer, ref_folder, 0, digest
    )
    ref = suspects.Images(
      ref_table, ref_folder.source, FOLDER_KEY_OFFSETS['reference'], ref_folder.files
    )
  else:
    ref = suspects.Images({k: v[~is_member] for k, v in table.items()}, source, 0)
  member_features, ref_features = _features(table, names)[is_member], _features(ref.table, names)
  combiner = combiners.fit(
    ds.combiner, member_features[~member_heldout], ref_features[~ref_heldout], names
  )
  member_pool, ref_pool = member_features[member_heldout], ref_features[ref_heldout]
  reference = ref_pool[keep]
  if suspect is not None:
    sus_table = _score_folder(config, root, scorer, suspect, -1, digest)
    sus = suspects.Images(sus_table, suspect.source, FOLDER_KEY_OFFSETS['suspect'], suspect.files)
    sus_rows = np.arange(len(suspect))
    suspect_info = {
      'source': f'folder {suspect.path}',
      'n': len(suspect),
      'reference_images_dropped_as_identical': int((~keep).sum()),
    }
  else:
    if ds.suspect == 'members':
      sus, sus_rows = split, np.flatnonzero(is_member)[member_heldout][pick]
    else:
      sus, sus_rows = ref, np.flatnonzero(ref_heldout)[pick]
    suspect_info = {'source': what, 'n': int(ds.size), 'seed': int(ds.seed)}
  suspect_features = _features(sus.table, names)[sus_rows]
  tests = compare_sets(suspect_features, reference, combiner, ds.alpha)
  power = power_curve(
    member_pool,
    ref_pool,
    combiner,
    sizes=tuple(ds.power_sizes),
    repetitions=ds.power_repetitions,
    alpha=ds.alpha,
    seed=ds.seed,
  )
  evidence = results_lib.strongest_suspects(
    config, scorer, sus, sus_rows, combiner.score(suspect_features), table
  )
  fraction = (
    f'the calibration fraction (audit.calibration_fraction = {a.calibration_fraction}, '
    f'seed {config.seed}) of'
  )
  if combiner.kind == combiners.MEMBER_LABELS:
    fit_what = f"{fraction} the split's members (their member labels) and of {ref_source}"
  else:
    fit_what = f'{fraction} {ref_source} (no member label, no member)'

  result = {
    'name': name,
    'alpha': float(ds.alpha),
    'primary': COMBINED,
    'reject': tests[COMBINED]['reject'],
    'verdict': tests[COMBINED]['verdict'],
    'suspect': suspect_info,
    'reference': {
      'source': ref_source,
      'n_test': len(reference),
      'n_fit': int((~ref_heldout).sum()),
      'n_heldout': len(ref_pool),
    },
    'combiner': combiners.record(combiner, (~member_heldout).sum(), (~ref_heldout).sum(), fit_what),
    'tests': tests,
    'power': power,
    'evidence': [
      {k: v for k, v in e.items() if k not in suspects.EVIDENCE_ARRAYS} for e in evidence
    ],
    'validity': [
      f'The combiner saw only {fit_what}.',
      'The test reference is the held-out rest of the reference, less any image drawn into '
      'the suspect set or identical (SHA-256) to a suspect image; no suspect image fitted '
      'anything.',
      'Under the null hypothesis (suspect images are non-members distributed like the '
      'reference) suspect and reference scores are exchangeable given the combiner, so the '
      'one-sided Mann-Whitney test rejects with probability at most alpha (exact p-values, '
      'conditional on the tied groups where there are ties, or a permutation p-value; the '
      'normal approximation where method is "normal").',
      'The verdict is the combined test; per-attack tests are not corrected for multiplicity.',
    ],
    'fingerprint': fp,
    'config': json.loads(json.dumps(ds.to_dict(), default=list)),
  }
  result = json.loads(json.dumps(result))
  if parallel.is_writer():
    suspects.save_evidence(root, evidence)
    fileio.atomic_write_text(
      root / suspects.RESULT_JSON, json.dumps(result, indent=1, sort_keys=True)
    )
  parallel.sync('dataset_written')
  results_lib.write_results(config, workdir, scorer, source)
  return result


def format_summary(result: dict[str, Any]) -> str:
  """A plain-text summary of a set's ``dataset.json`` for the terminal."""
  lines = [
    f'suspect set {result["name"]}: {result["suspect"]["source"]} ({result["suspect"]["n"]} '
    f'images); reference: {result["reference"]["source"]} ({result["reference"]["n_test"]} '
    f'held-out images in the test)',
    f'{"test":10s} {"p-value":>10s} {"AUC":>7s} {"method":>7s}  verdict',
  ]
  for name, t in result['tests'].items():
    lines.append(
      f'{name:10s} {t["p_value"]:10.3g} {t["auc"]:7.3f} {t["method"]:>7s}  '
      f'{"detected" if t["reject"] else "-"}'
    )
  lines.append(f'verdict (combined): {result["verdict"]}')
  lines.append(f'combiner: {combiners.describe(result["combiner"])}')
  power = result['power']
  for kind, label in (('members', 'TPR'), ('nonmembers', 'FPR')):
    entry = power[kind]
    rates = ', '.join(f'{n}: {r:.2f}' for n, r in zip(entry['sizes'], entry[COMBINED]['rate']))
    lines.append(f'power curve {label} ({kind}, {power["repetitions"]} sets per size): {rates}')
  upper = power['nonmembers'].get('fpr_upper', {}).get(COMBINED)
  if upper is not None:
    status = power['nonmembers']['fpr_check'][COMBINED]
    lines.append(
      f'FPR upper bound (Clopper-Pearson 95%; <= alpha = {power["alpha"]:g} shows the rate): '
      + ', '.join(
        f'{n}: {u:.3f} {c}' for n, u, c in zip(power['nonmembers']['sizes'], upper, status)
      )
    )
    if power['repetitions'] < power['repetitions_needed']:
      lines.append(
        f'  {power["repetitions"]} sets per size cannot show FPR <= alpha even with no rejection: '
        f'it needs {power["repetitions_needed"]} (config.dataset.power_repetitions)'
      )
  strongest = [e.get('file') or f'#{e["index"]}' for e in result.get('evidence', ())]
  if strongest:
    lines.append(f'strongest suspects (combined score): {", ".join(strongest)}')
  return '\n'.join(lines)
