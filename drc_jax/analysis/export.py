"""Exporting a trained target for shipping inside drc_jax (``drc_jax/targets/<name>/``).

  python -m drc_jax.analysis export --config=configs/fashion_mnist.py --workdir=W --step=8000 \
      --out=drc_jax/targets/fashion_mnist --log=train.log

writes the safetensors EMA weights, ``model.json``, ``split.json`` and ``training.json`` (command,
seed, config, a summary of the training log and the SHA-256 of each file), the layout
``drc_jax.targets.shipped`` loads and verifies.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import numpy as np
from etils import epath
from safetensors import numpy as st_numpy

from drc_jax.audit import metrics as metrics_lib
from drc_jax.audit import results, store
from drc_jax.core import errors, fileio
from drc_jax.data import splits as splits_lib
from drc_jax.models import unet as model_lib
from drc_jax.targets import checkpoints, shipped
from drc_jax.targets import load as target_lib


def training_summary(log_text: str, every: int = 1000) -> list[dict[str, float]]:
  """(step, loss, steps/s) of the training log lines at multiples of ``every`` steps."""
  out = []
  for m in re.finditer(
    r'step (\d+)/\d+ loss ([0-9.eE+-]+) grad_norm ([0-9.eE+-]+) '
    r'([0-9.]+) steps/s',
    log_text,
  ):
    step = int(m.group(1))
    if step % every == 0:
      out.append(
        {
          'step': step,
          'loss': float(m.group(2)),
          'grad_norm': float(m.group(3)),
          'steps_per_s': float(m.group(4)),
        }
      )
  return out


def export(
  workdir: str, out: str, *, step: int, config, command: str, log_path: str = ''
) -> dict[str, Any]:
  """Writes the shipped-target directory ``out`` from checkpoint ``step`` of ``workdir``.

  The config's ``train.steps`` must equal ``step`` (the shipped recipe must reproduce it).
  """
  if int(config.train.steps) != int(step):
    raise ValueError(
      f'config.train.steps ({config.train.steps}) must equal the exported step '
      f'{step}: the shipped recipe has to reproduce the shipped weights'
    )
  ckpt = epath.Path(workdir) / checkpoints.CHECKPOINT_DIR / str(step)
  target = target_lib.load_target(str(ckpt))
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  flat = {
    k: np.ascontiguousarray(np.asarray(v, np.float32))
    for k, v in model_lib.flat_params(target.params).items()
  }
  fileio.atomic_write_bytes(out_dir / shipped.WEIGHTS, st_numpy.save(flat))
  model_doc = json.loads((epath.Path(workdir) / checkpoints.MODEL_JSON).read_text())
  model_doc['step'] = int(step)
  if 'trained_on' not in model_doc:  # trained before drc_jax recorded it: derive it from the split
    source = splits_lib.run_source(config)
    split = splits_lib.resolve(config.split, source, workdir, write=False)
    model_doc['trained_on'] = splits_lib.training_data(config, source, split)
  fileio.atomic_write_text(out_dir / checkpoints.MODEL_JSON, json.dumps(model_doc, indent=1))
  fileio.atomic_write_text(
    out_dir / shipped.SPLIT_JSON, (epath.Path(workdir) / shipped.SPLIT_JSON).read_text()
  )
  log_text = epath.Path(log_path).read_text() if log_path else ''
  doc = {
    'command': command,
    'seed': int(config.seed),
    'step': int(step),
    'exported': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
    'num_params': model_lib.count_params(target.params),
    'training_log': [r for r in training_summary(log_text) if r['step'] <= step],
    'config': json.loads(json.dumps(config.to_dict(), default=list)),
    'sha256': {name: shipped.sha256_file(out_dir / name) for name in shipped.HASHED},
  }
  fileio.atomic_write_text(out_dir / shipped.TRAINING_JSON, json.dumps(doc, indent=1))
  return doc


def write_thresholds(config, audit_workdir: str, target_dir: str) -> dict[str, Any]:
  """Writes ``thresholds.json`` into the shipped-target directory ``target_dir`` from the scores
  of an audit of that target (``audit_workdir``, audited with ``config``): every attack's scores
  of the audit's calibration non-members (``metrics.calibration_split``), the images nothing
  held-out is measured on. Its SHA-256 joins the others in ``training.json``.

  Raises:
    drc_jax.UserError: the workdir's scores are not an audit of this target with this config.
  """
  recorded = store.recorded_fingerprint(audit_workdir)
  out_dir = epath.Path(target_dir)
  audited = (recorded or {}).get('audit', {}).get('checkpoint', '')
  if recorded is None or shipped.resolve(audited) != shipped.resolve(str(target_dir)):
    raise errors.WorkdirError(
      f'{audit_workdir}: not an audit of the target {target_dir} (its audit.checkpoint is '
      f'{audited!r}); audit it first with --config.audit.checkpoint naming it'
    )
  table = store.load_scores(audit_workdir)
  split = table['split']
  if (split == 1).sum() < 2 or (split == 0).sum() < 2:
    raise errors.WorkdirError(f'{audit_workdir}: too few scored members and non-members')
  rule = results.apply_drc_rule(config, table)  # DRC scored as the audit scores it
  _, non_heldout = metrics_lib.calibration_split(
    int((split == 1).sum()),
    int((split == 0).sum()),
    fraction=config.audit.calibration_fraction,
    seed=config.seed,
  )
  names = [k.split('/', 1)[1] for k in table if k.startswith('score/')]
  doc = {
    'what': 'scores of the calibration non-members of an audit of this target; decisions '
    'are calibrated on these alone (drc_jax.Auditor)',
    'command': 'python -m drc_jax.main --mode=audit --workdir=W && '
    'python -m drc_jax.analysis thresholds --workdir=W',
    'audit_fingerprint': recorded,
    'calibration_fraction': float(config.audit.calibration_fraction),
    'seed': int(config.seed),
    'n_nonmembers': int((~non_heldout).sum()),
    'nonmember_index': table['index'][split == 0][~non_heldout].tolist(),
    'drc_rule': None
    if rule is None
    else {k: rule[k] for k in ('aggregation', 'vote_threshold', 'vote_quantile')},
    'nonmember_scores': {
      n: table[f'score/{n}'][split == 0][~non_heldout].astype(float).tolist() for n in names
    },
  }
  fileio.atomic_write_text(out_dir / shipped.THRESHOLDS_JSON, json.dumps(doc, indent=1))
  training = out_dir / shipped.TRAINING_JSON
  if training.exists():
    record = json.loads(training.read_text())
    record['sha256'][shipped.THRESHOLDS_JSON] = shipped.sha256_file(
      out_dir / shipped.THRESHOLDS_JSON
    )
    # The protocol the shipped audit runs (its 'config' records what trained the target; the
    # DRC and attack settings there are those of the training run, not of the audit).
    c = config.to_dict()
    record['audit_protocol'] = json.loads(
      json.dumps({'drc': c['drc'], 'attacks': c['attacks']}, default=list)
    )
    fileio.atomic_write_text(training, json.dumps(record, indent=1))
  return doc
