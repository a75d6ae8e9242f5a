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

* the combiner, an L2-regularized logistic regression on the attacks' standardized scores, is
  fitted on the calibration fraction of the members and of the reference, and on nothing else;
* the test compares the suspect set with the held-out reference, less any image drawn into the
  suspect set and any image identical (SHA-256) to a suspect image;
* the suspect images never fit anything.

So under the null hypothesis "the suspect images are non-members like the reference", suspect and
test-reference scores are exchangeable given the combiner, and the one-sided Mann-Whitney U test
(``stats.mann_whitney_greater``: exact without ties when small enough, else the normal
approximation) has P(p < alpha) <= alpha. The verdict is the combined test's (one pre-declared
test); the per-attack tests are reported beside it, each at alpha, uncorrected for multiplicity.

The power curve repeats the test on random suspect sets of each size in ``dataset.power_sizes``:
drawn from the held-out members (true-positive rate) and from the held-out reference (false-positive
rate, with the rest of the held-out reference as the test reference), each with a Clopper-Pearson
95% interval. A random partition of one pool of non-members makes the exact test exact
conditionally on the pool, so each non-member repetition rejects with probability at most alpha.
The repetitions share one pool, so the binomial interval is approximate.

A workdir keeps any number of suspect sets, each under its name (``suspects.py``): its result
goes to ``W/dataset/suspects/<name>/dataset.json`` with DRC's panels of its strongest suspects;
the report shows a section per set (``report.html``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
from absl import logging

from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import results as results_lib
from drc_jax.audit import scoring as audit_lib
from drc_jax.audit import stats, store, suspects, validate
from drc_jax.core import fileio, parallel, streams

COMBINED = 'combined'
COMBINER_L2 = 1e-2  # ridge penalty of the logistic combiner (standardized scores, balanced classes)
# Attack keys of folder images derive from their position plus an offset per role, so a folder
# image shares no key with a dataset image (indices < 2^31) or with the reference folder (suspect
# folders share one offset: sets are never compared with each other).
FOLDER_KEY_OFFSETS = {'suspect': 2**31, 'reference': 2**31 + 2**30}


# ----------------------------------------------------------------------------------------------
# The combiner.


@dataclasses.dataclass(frozen=True)
class Combiner:
  """A linear combination of the attacks' scores, higher = member.

  Attributes:
    names: the attacks, in feature order.
    mean, scale: float64 [A], the standardization (of the fitting images).
    weights: float64 [A], logistic-regression weights on standardized scores.
    bias: the intercept (irrelevant to the rank test; kept for the probability).
  """

  names: tuple[str, ...]
  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray
  bias: float

  def score(self, features) -> np.ndarray:
    """The combined score of each row of ``features`` [N, A]: [N]."""
    return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.weights


def _objective(beta, z, y, w, l2):
  f = z @ beta
  loss = np.sum(w * (np.logaddexp(0.0, f) - y * f))  # balanced log loss
  return loss + 0.5 * l2 * np.sum(beta[1:] ** 2)


def fit_combiner(
  member_features, nonmember_features, names, l2: float = COMBINER_L2, max_steps: int = 100
) -> Combiner:
  """L2-regularized logistic regression of membership on standardized scores (damped Newton).

  Minimizes ``sum_i c_i (log(1 + e^f_i) - y_i f_i) + l2 / 2 |w|^2`` with ``f = b + w . z``, class
  weights ``c_i`` of 1 / (2 P) for members and 1 / (2 N) for non-members (balanced), and ``z`` the
  scores standardized by the fitting images' mean and standard deviation. The intercept is not
  penalized. Strictly convex for ``l2 > 0``, so the Newton steps (halved until the objective
  decreases) reach the unique minimum.

  Args:
    member_features: float [P, A], P >= 1.
    nonmember_features: float [N, A], N >= 1.
    names: the A attack names.
    l2: the ridge penalty, > 0.
    max_steps: Newton steps at most.

  Returns:
    A ``Combiner``.
  """
  mem = np.asarray(member_features, np.float64)
  non = np.asarray(nonmember_features, np.float64)
  if mem.ndim != 2 or non.ndim != 2 or mem.shape[1] != non.shape[1] or not len(mem) or not len(non):
    raise ValueError(f'combiner features must be [P, A] and [N, A], got {mem.shape}, {non.shape}')
  if l2 <= 0:
    raise ValueError(f'l2 must be > 0, got {l2}')
  x = np.concatenate([mem, non])
  y = np.concatenate([np.ones(len(mem)), np.zeros(len(non))])
  w = np.concatenate([np.full(len(mem), 0.5 / len(mem)), np.full(len(non), 0.5 / len(non))])
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  z = np.concatenate([np.ones((len(x), 1)), (x - mean) / scale], axis=1)  # [P + N, 1 + A]
  penalty = np.diag(np.r_[0.0, np.full(x.shape[1], l2)])
  beta = np.zeros(z.shape[1])
  current = _objective(beta, z, y, w, l2)
  for _ in range(max_steps):
    p = 1.0 / (1.0 + np.exp(-(z @ beta)))
    grad = z.T @ (w * (p - y)) + penalty @ beta
    hess = z.T @ (z * (w * p * (1 - p))[:, None]) + penalty
    step = np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
    t = 1.0
    while t > 1e-8:
      new = _objective(beta - t * step, z, y, w, l2)
      if new <= current:
        break
      t /= 2
    beta, current = beta - t * step, new
    if np.max(np.abs(t * step)) < 1e-10:
      break
  return Combiner(tuple(names), mean, scale, beta[1:], float(beta[0]))


# ----------------------------------------------------------------------------------------------
# The test.


def compare_sets(suspect, reference, combiner: Combiner, alpha: float) -> dict[str, dict[str, Any]]:
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
  combiner: Combiner,
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
    {``alpha``, ``repetitions``, ``interval`` ('Clopper-Pearson 95%'), ``pools``, and per kind
    ('members', 'nonmembers'): ``sizes`` and per test name (combined and each attack)
    ``rejections``, ``rate`` and ``ci95`` (one per size); for 'nonmembers' also
    ``within_alpha`` (per size: the interval's lower end is at most alpha)}.
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
      entry['within_alpha'] = {
        name: [lo <= alpha for lo, _ in entry[name]['ci95']] for name in names
      }
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
  combiner = fit_combiner(member_features[~member_heldout], ref_features[~ref_heldout], names)
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
  fit_what = (
    f'the calibration fraction (audit.calibration_fraction = {a.calibration_fraction}, '
    f"seed {config.seed}) of the split's members and of {ref_source}"
  )
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
    'combiner': {
      'kind': 'logistic',
      'l2': COMBINER_L2,
      'features': list(names),
      'weights': dict(zip(names, combiner.weights.tolist())),
      'fit': {
        'n_members': int((~member_heldout).sum()),
        'n_nonmembers': int((~ref_heldout).sum()),
        'images': fit_what,
      },
    },
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
      'one-sided Mann-Whitney test rejects with probability at most alpha (exact p-values; '
      'the normal approximation where method is "normal").',
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
  power = result['power']
  for kind, label in (('members', 'TPR'), ('nonmembers', 'FPR')):
    entry = power[kind]
    rates = ', '.join(f'{n}: {r:.2f}' for n, r in zip(entry['sizes'], entry[COMBINED]['rate']))
    lines.append(f'power curve {label} ({kind}, {power["repetitions"]} sets per size): {rates}')
  strongest = [e.get('file') or f'#{e["index"]}' for e in result.get('evidence', ())]
  if strongest:
    lines.append(f'strongest suspects (combined score): {", ".join(strongest)}')
  return '\n'.join(lines)
