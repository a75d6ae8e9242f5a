"""AUC of every attack against the target's training steps, from the checkpoints of a training run
(``python -m drc_jax.analysis steps-curve --workdir=W --steps=2000,4000,...``): how far training
must go before each attack sees membership. The baselines score every image, DRC a random subset.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from drc_jax.attacks import registry as attacks_lib
from drc_jax.audit import metrics as metrics_lib
from drc_jax.core import fileio, progress, streams
from drc_jax.data import sources as data_lib
from drc_jax.data import splits as splits_lib
from drc_jax.targets import load as target_lib


def steps_curve(
  config,
  workdir: str,
  steps: list[int],
  out_dir: str,
  *,
  drc_members: int,
  drc_nonmembers: int,
  batch_size: int,
) -> dict[str, Any]:
  """AUC of every attack against training steps: the checkpoints ``steps`` of ``workdir``.

  The baselines score every image of the split; DRC (the config's protocol) scores a random
  subset of ``drc_members`` members and ``drc_nonmembers`` non-members (the same images at every
  step). Writes ``steps_curve.json`` and ``steps_curve.md``.
  """
  source = splits_lib.run_source(config)
  split = splits_lib.resolve(config.split, source, workdir, write=False)
  members, _, _ = data_lib.load_images(source, split.members, config.data)
  nonmembers, _, _ = data_lib.load_images(source, split.nonmembers, config.data)
  rng = np.random.default_rng([config.seed, streams.HOST_SWEEP_CURVE])
  pick_m = np.sort(rng.choice(len(members), min(drc_members, len(members)), replace=False))
  pick_n = np.sort(rng.choice(len(nonmembers), min(drc_nonmembers, len(nonmembers)), replace=False))
  names = ['loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse']
  rows = []
  for step in steps:
    target = target_lib.load_target(os.path.join(workdir, 'checkpoints', str(step)))
    attacks = attacks_lib.make_attacks(config, target.model, target.schedule, names + ['drc'])
    base = {n: a for n, a in attacks.items() if n != 'drc'}
    score_base = progress.announce_compiles(
      jax.jit(attacks_lib.make_batch_scorer(base)), f'baseline scorer of step {step}', batch_arg=3
    )
    score_drc = progress.announce_compiles(
      jax.jit(attacks_lib.make_batch_scorer({'drc': attacks['drc']})),
      f'DRC scorer of step {step}',
      batch_arg=3,
    )
    row = {'step': step}

    def run_scorer(fn, images, indices, names_, target=target):
      out = {n: [] for n in names_}
      for lo in range(0, len(images), batch_size):
        idx = np.resize(indices[lo : lo + batch_size], batch_size)
        x = jnp.asarray(np.resize(images[lo : lo + batch_size], (batch_size,) + images.shape[1:]))
        res = fn(target.params, {}, attacks_lib.keys_for(names_, config.seed, idx), x)
        valid = min(batch_size, len(images) - lo)
        for n in names_:
          v = np.asarray(res[n])[:valid]
          out[n].append(v.mean(axis=1) if v.ndim == 2 else v)
      return {n: np.concatenate(v) for n, v in out.items()}

    t0 = time.time()
    sm = run_scorer(score_base, members, split.members, list(base))
    sn = run_scorer(score_base, nonmembers, split.nonmembers, list(base))
    for n in base:
      row[n] = metrics_lib.auc(sm[n], sn[n])
    dm = run_scorer(score_drc, members[pick_m], split.members[pick_m], ['drc'])['drc']
    dn = run_scorer(score_drc, nonmembers[pick_n], split.nonmembers[pick_n], ['drc'])['drc']
    row['drc'] = metrics_lib.auc(dm, dn)
    rows.append(row)
    logging.info(
      'step %d: %s (%.0fs)',
      step,
      {k: round(v, 3) for k, v in row.items() if k != 'step'},
      time.time() - t0,
    )
  doc = {
    'workdir': workdir,
    'drc_subset': {'members': len(pick_m), 'nonmembers': len(pick_n)},
    'drc': dict(config.drc),
    'rows': rows,
  }
  os.makedirs(out_dir, exist_ok=True)
  fileio.atomic_write_text(
    os.path.join(out_dir, 'steps_curve.json'), json.dumps(doc, indent=1, default=list)
  )
  cols = ['drc'] + names
  lines = ['| step | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
  for r in rows:
    lines.append(f'| {r["step"]} | ' + ' | '.join(f'{r[c]:.3f}' for c in cols) + ' |')
  fileio.atomic_write_text(os.path.join(out_dir, 'steps_curve.md'), '\n'.join(lines) + '\n')
  return doc
