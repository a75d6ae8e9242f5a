"""The generated-image control: how often does each attack call the target's own samples members?

Attacks flag a model's generations as training members (Tracing the Roots, arXiv 2411.07449), and
a restoration score such as DRC's is exposed to it by construction: a model restores what it
generates well. A user who audits scraped images that may be generations needs that rate. So the
audit scores the samples of the sample check (``samples.py``: deterministic DDIM from pure noise;
a text-conditioned target's under the held-out real non-members' captions, and scored under them)
with every attack, as known non-members, and reports each attack's false-positive rate on them at
its calibrated threshold (fit on the calibration part), beside its held-out false-positive rate on
real non-members, both with 95% Wilson intervals.

The samples are quantized to 8 bits first (how a generation reaches a user: a saved image) and
then prepared like every audited image. Sample i's attack keys are
``image_keys(seed, streams.GENERATED + streams.ATTACKS[name], i)``, disjoint from the real
images' keys. The scores are kept in ``W/generated.npz`` for the audit's fingerprint and samples,
so a report redraws without scoring them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import types
from typing import Any

import jax
import numpy as np
from etils import epath

from drc_jax.attacks import registry as attacks_lib
from drc_jax.audit import metrics as metrics_lib
from drc_jax.core import fileio, parallel, progress, streams
from drc_jax.data import sources as data_lib
from drc_jax.drc import scorer as drc_lib

GENERATED_FILE = 'generated.npz'


class SampleSource:
  """The target's samples as an ``ImageSource``: uint8 images, no labels."""

  def __init__(self, samples: np.ndarray, captions: list[str] | None = None):
    x = np.asarray(samples, np.float64)
    self.images = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    self.name = 'generated samples of the target'
    self.label_names = ()
    # a text-conditioned target's samples are audited under the prompts they were sampled with
    self.captions = [''] * len(self.images) if captions is None else list(captions)
    if len(self.captions) != len(self.images):
      raise ValueError(f'SampleSource: {len(self.captions)} captions, {len(self.images)} samples')

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices):
    idx = np.asarray(indices, np.int64).reshape(-1)
    return self.images[idx], np.full(len(idx), -1, np.int64)


def keys_for(names, seed: int, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Per-attack key data of generated samples ``indices`` (disjoint from the real images')."""
  return {
    n: drc_lib.image_keys(seed, streams.GENERATED + streams.ATTACKS[n], indices) for n in names
  }


def _data_config(data_cfg):
  """The samples are at the model's resolution already: no crop, and no resize."""
  return types.SimpleNamespace(
    channels=data_cfg.channels,
    convert_channels=data_cfg.convert_channels,
    center_crop=0,
    resolution=data_cfg.resolution,
  )


def score_samples(config, scorer, samples: np.ndarray, captions=None) -> dict[str, np.ndarray]:
  """Every attack's scores of the samples ``[S, H, W, C]`` in [-1, 1]: ``{name: float64 [S]}``
  (DRC: its K similarities [S, K]; ``control`` turns them into its audited score); a
  text-conditioned target's under ``captions``, the samples' prompts."""
  source = SampleSource(samples, captions)
  data_cfg = _data_config(config.data)
  names = scorer.names
  bs = config.audit.batch_size
  p_idx, p_cnt = jax.process_index(), jax.process_count()
  rows: dict[str, list] = {}
  bar = progress.Progress("scoring the target's samples", len(source), 'images')
  for slot in data_lib.batch_slots(len(source), bs, p_idx, p_cnt):
    pos = np.where(slot.valid, slot.positions, 0)
    images, _, _ = data_lib.load_images(source, pos, data_cfg)
    keys = keys_for(names, config.seed, pos)
    side, _ = scorer.side_fn(source, pos)
    out = attacks_lib.score_batch(scorer, keys, images, side, slot.valid)
    for name, v in out.items():
      rows.setdefault(name, []).append(v)
    bar.update(len(next(iter(out.values()))))
  bar.close()
  return {name: np.concatenate(chunks).astype(np.float64) for name, chunks in rows.items()}


def load_or_score(
  config, workdir: str, scorer, samples: np.ndarray, fingerprint: str, captions=None
) -> dict[str, np.ndarray]:
  """``score_samples``, kept in ``W/generated.npz`` for this fingerprint, these samples and their
  captions."""
  fields = {
    'fingerprint': fingerprint,
    'samples_sha256': data_lib.image_hashes(SampleSource(samples).images),
    'names': list(scorer.names),
    'drc': 'similarities [S, K]',
  }
  if captions is not None:
    fields['captions_sha256'] = hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()
  ident = json.dumps(fields, sort_keys=True)
  path = epath.Path(workdir) / GENERATED_FILE
  if path.exists():
    try:
      with path.open('rb') as f:
        z = np.load(io.BytesIO(f.read()), allow_pickle=False)
      if str(z['ident']) == ident:
        return {n: np.asarray(z[f'score/{n}'], np.float64) for n in scorer.names}
    except (OSError, ValueError, KeyError):
      pass  # unreadable or of another version: scored again and replaced
  scores = score_samples(config, scorer, samples, captions)
  if parallel.is_writer():
    buf = io.BytesIO()
    np.savez(buf, ident=np.asarray(ident), **{f'score/{n}': v for n, v in scores.items()})
    fileio.atomic_write_bytes(path, buf.getvalue())
  return scores


def control(metrics: dict[str, Any], scores: dict[str, np.ndarray]) -> dict[str, dict]:
  """Per attack: the false-positive rate on generated samples at the attack's calibrated
  threshold, with its 95% Wilson interval, beside the held-out FPR on real non-members. DRC's
  similarities [S, K] are scored by the audit's rule (``metrics['drc']``: aggregation and vote
  threshold)."""
  out = {}
  for name, s in scores.items():
    cal = metrics[name]['calibrated']
    s = np.asarray(s, np.float64)
    if s.ndim == 2:
      rule = metrics[name]
      s = drc_lib.aggregate(s, rule.get('aggregation', 'mean'), rule.get('vote_threshold'))
    flagged = int(np.sum(s >= cal['threshold']))
    out[name] = {
      'n': int(s.size),
      'fpr': flagged / s.size if s.size else float('nan'),
      'ci95': metrics_lib.wilson_interval(flagged, int(s.size)),
      'real_nonmember_fpr': cal['fpr'],
      'real_nonmember_ci95': cal['ci95']['fpr'],
    }
  return out
