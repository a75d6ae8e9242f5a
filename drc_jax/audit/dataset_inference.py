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
images into their own resumable shards (``W/dataset/suspect/scores``, ``W/dataset/reference``).

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

Results go to ``W/dataset.json``; the report shows them (``report.html``, dataset section).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import results as results_lib
from drc_jax.audit import scoring as audit_lib
from drc_jax.audit import stats, store, validate
from drc_jax.core import errors, fileio, parallel, records, streams
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib

DATASET_DIR = 'dataset'
FOLDER_CONFIG = 'folder_config.json'
COMBINED = 'combined'
COMBINER_L2 = 1e-2  # ridge penalty of the logistic combiner (standardized scores, balanced classes)
# Attack keys of folder images derive from their position plus an offset per role, so a folder
# image shares no key with a dataset image (indices < 2^31) or with the other folder.
FOLDER_KEY_OFFSETS = {'suspect': 2**31, 'reference': 2**31 + 2**30}
_FOLDER_HASH_BATCH = 1024


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
# Folder images: their own resumable score shards.


def _folder_digest(source: data_lib.FolderSource) -> str:
  hashes = []
  for lo in range(0, len(source), _FOLDER_HASH_BATCH):
    raw, _ = source.read(np.arange(lo, min(lo + _FOLDER_HASH_BATCH, len(source))))
    hashes += data_lib.image_hashes(raw)
  return splits_lib.set_hash(hashes)


def score_folder(
  config,
  workdir: str,
  scorer: audit_lib.Scorer,
  role: str,
  path: str,
  split_value: int,
  overwrite: bool = False,
) -> dict[str, np.ndarray]:
  """Scores the images of folder ``path`` into ``W/dataset/<role>/scores`` (resumable).

  The shards are tied to the audit's config fingerprint and to the folder's contents (a SHA-256
  over every image); a change refuses the old shards, or discards them with ``overwrite``.

  Returns:
    The folder's score table (``store.load_scores``), rows in sorted file order.
  """
  source = data_lib.FolderSource(path, config.data.resolution, f'config.dataset.{role}_dir')
  if role == 'reference' and len(source) < 2:
    raise data_lib.DataError(
      f'{path}: {len(source)} image; config.dataset.reference_dir needs at least 2 (part of the '
      f'reference fits the combiner, the rest is tested against)'
    )
  root = epath.Path(workdir) / DATASET_DIR / role
  record = {
    'scores': store.fingerprint(config, scorer.target),
    'folder': os.path.abspath(path),
    'num_images': len(source),
    'sha256': _folder_digest(source),
  }
  record = json.loads(json.dumps(record))
  # Every file was read for the digest: one kind of image across the whole folder (FolderSource),
  # and that kind must be the target's, before anything of an earlier folder moves.
  d = config.data
  if source.channels != d.channels and not d.convert_channels:
    raise data_lib.DataError(
      f'{path}: its images have {source.channels} channel(s) but config.data.channels is '
      f'{d.channels} (set config.data.convert_channels=True to convert gray<->RGB)'
    )
  record_path = root / FOLDER_CONFIG
  if record_path.exists():
    old = records.read_json(record_path, errors.WorkdirError)
    changes = store.diff(old, record)
    if changes and not overwrite:
      raise store.AuditConfigMismatch(
        f'{root} holds scores of another config or folder (config.dataset.{role}_dir; '
        f'{"; ".join(changes[:4])}). Pass --overwrite to move them to '
        f'{workdir}/{store.SUPERSEDED_DIR}/.'
      )
    if changes and parallel.is_writer() and (root / store.SCORES_DIR).exists():
      dest = store.superseded_dir(workdir) / DATASET_DIR / role
      dest.mkdir(parents=True)
      fileio.move(root / store.SCORES_DIR, dest / store.SCORES_DIR)
      fileio.move(record_path, dest / FOLDER_CONFIG)
      logging.warning(
        '--overwrite: the %s scores of %s moved to %s', role, old.get('folder', root), dest
      )
  parallel.sync(f'dataset_{role}_checked')
  if parallel.is_writer():
    fileio.atomic_write_text(record_path, json.dumps(record, indent=1, sort_keys=True))
  indices = np.arange(len(source), dtype=np.int64)
  logging.info('%s folder %s: %d images', role, path, len(source))
  audit_lib.score_images(
    config,
    str(root),
    scorer,
    source,
    np.full(len(source), split_value, np.int8),
    indices,
    key_indices=indices + FOLDER_KEY_OFFSETS[role],
  )
  return store.load_scores(str(root), store.fingerprint_digest(record['scores']))


# ----------------------------------------------------------------------------------------------
# --mode=dataset.


def _features(table, names) -> np.ndarray:
  return np.stack([np.asarray(table['score/' + n], np.float64) for n in names], axis=1)


def run(config, workdir: str, overwrite: bool = False) -> dict[str, Any]:
  """``--mode=dataset``: scores what is missing, tests the suspect set, writes ``dataset.json``.

  Also rewrites ``metrics.json`` and ``report.html`` (with the dataset section). Returns the
  ``dataset.json`` contents.
  """
  validate.check(config)
  validate.check_dataset(config, require_suspect=True)
  ds, a = config.dataset, config.audit
  scorer, source = audit_lib.score_split(config, workdir, overwrite)
  names = scorer.names
  table = store.load_scores(
    workdir, store.fingerprint_digest(store.fingerprint(config, scorer.target))
  )
  is_member = np.asarray(table['split']) == 1
  member_features = _features(table, names)[is_member]
  if ds.reference_dir:
    ref_table = score_folder(config, workdir, scorer, 'reference', ds.reference_dir, 0, overwrite)
    ref_source = f'folder {os.path.abspath(ds.reference_dir)}'
  else:
    ref_table = {k: v[~is_member] for k, v in table.items()}
    ref_source = "the split's non-members"
  ref_features, ref_hashes = _features(ref_table, names), np.asarray(ref_table['hash'])
  member_heldout, ref_heldout = metrics_lib.calibration_split(
    len(member_features), len(ref_features), fraction=a.calibration_fraction, seed=config.seed
  )
  combiner = fit_combiner(member_features[~member_heldout], ref_features[~ref_heldout], names)
  member_pool, ref_pool = member_features[member_heldout], ref_features[ref_heldout]
  ref_pool_hashes = ref_hashes[ref_heldout]

  rng = np.random.default_rng([ds.seed, streams.HOST_SUSPECT])
  if ds.suspect_dir:
    sus_table = score_folder(config, workdir, scorer, 'suspect', ds.suspect_dir, -1, overwrite)
    suspect = _features(sus_table, names)
    keep = ~np.isin(ref_pool_hashes, np.asarray(sus_table['hash']))
    reference = ref_pool[keep]
    suspect_info = {
      'source': f'folder {os.path.abspath(ds.suspect_dir)}',
      'n': len(suspect),
      'reference_images_dropped_as_identical': int((~keep).sum()),
    }
  else:
    pool = member_pool if ds.suspect == 'members' else ref_pool
    what = (
      "the split's held-out members"
      if ds.suspect == 'members'
      else f'the held-out part of {ref_source}'
    )
    room = len(pool) - (ds.suspect == 'nonmembers')  # non-member draws leave a reference
    if ds.size > room:
      raise validate.ConfigError(
        f'config.dataset.size: {ds.size} images asked of {what}, which can give {room} (its '
        f'calibration fraction fits the combiner and is never drawn); lower it'
      )
    pick = rng.choice(len(pool), ds.size, replace=False)
    suspect = pool[pick]
    if ds.suspect == 'nonmembers':
      reference = np.delete(ref_pool, pick, axis=0)
    else:
      reference = ref_pool
    suspect_info = {'source': what, 'n': int(ds.size), 'seed': int(ds.seed)}
  if not len(reference):
    raise validate.ConfigError(
      f'config.dataset.reference_dir: no held-out reference image is left for the test (of '
      f'{len(ref_pool)}, {len(ref_pool) - len(reference)} are suspect images); add known '
      f'non-members'
    )
  tests = compare_sets(suspect, reference, combiner, ds.alpha)
  power = power_curve(
    member_pool,
    ref_pool,
    combiner,
    sizes=tuple(ds.power_sizes),
    repetitions=ds.power_repetitions,
    alpha=ds.alpha,
    seed=ds.seed,
  )
  fit_what = (
    f'the calibration fraction (audit.calibration_fraction = {a.calibration_fraction}, '
    f"seed {config.seed}) of the split's members and of {ref_source}"
  )
  result = {
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
    'fingerprint': store.fingerprint(config, scorer.target),
    'config': json.loads(json.dumps(ds.to_dict(), default=list)),
  }
  result = json.loads(json.dumps(result))
  if parallel.is_writer():
    fileio.atomic_write_text(
      epath.Path(workdir) / store.DATASET_JSON, json.dumps(result, indent=1, sort_keys=True)
    )
  parallel.sync('dataset_written')
  results_lib.write_results(config, workdir, scorer, source)
  return result


def format_summary(result: dict[str, Any]) -> str:
  """A plain-text summary of ``dataset.json`` for the terminal."""
  lines = [
    f'suspect: {result["suspect"]["source"]} ({result["suspect"]["n"]} images); '
    f'reference: {result["reference"]["source"]} ({result["reference"]["n_test"]} '
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
  return '\n'.join(lines)
