"""Where the UNet's time goes on this backend: a per-operation table from a jax.profiler trace.

  python launch/profile_unet.py                         # embedded-default UNet, batch 16, forward
  python launch/profile_unet.py --batch=64 --train_step  # the training step instead
  python launch/profile_unet.py --ablate [--train_step]   # cost of each part, by removing it

Runs the jitted forward (or train step) a few times under ``jax.profiler.trace`` with a Perfetto
trace, reads the trace's XLA operation events and prints the time per operation kind (convolution,
fusion, dot, reduce, copy/transpose, ...) and the ten costliest operations, as a markdown table.

The trace does not see every operation: with XLA:CPU's Eigen convolutions (drc_jax's default on
jaxlib 0.10) the convolution work runs on Eigen's thread pool outside the traced thunks, so the
traced total falls short of the wall time. ``--ablate`` answers the same question another way: it
times, interleaved in one process, the program with one part removed at a time (GroupNorm, the
attention blocks, SiLU, and dropout in the train step) and reports what each removal saves; the
rest is the convolutions and what they feed.
"""

from __future__ import annotations

import argparse
import collections
import copy
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from drc_jax.core import config_base
from drc_jax.models import unet as model_lib


def _load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location('profiled_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fusion_contents(hlo_text: str) -> dict[str, str]:
  """{instruction name: what it computes} from the compiled HLO: a fusion is named by the
  heaviest operation inside its fused computation (convolution > dot > reduce > element-wise)."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    m = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.-]+)\s*\(.*\{\s*$', line)
    if m:
      current = m.group(1)
      bodies[current] = []
    elif current and line.strip() == '}':
      current = None
    elif current:
      op = re.search(r'=\s*[^ ]+\s+([a-z][a-z-]*)\(', line)
      if op:
        bodies[current].append(op.group(1))
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=.*\bcalls=%?([\w.-]+)', line)
    if m:
      ops = bodies.get(m.group(2), [])
      for kind in ('convolution', 'dot', 'reduce-window', 'reduce', 'transpose', 'copy'):
        if kind in ops:
          out[m.group(1)] = kind
          break
      else:
        out[m.group(1)] = 'element-wise'
  return out


def _program(config, batch: int, train_step: bool):
  unet_cfg = model_lib.unet_config_from(config.model, config.data.resolution, config.data.channels)
  res, ch = config.data.resolution, config.data.channels
  x = np.random.default_rng(0).uniform(-1, 1, (batch, res, res, ch)).astype(np.float32)
  if not train_step:
    model, params = model_lib.DiffusionModel.create(unet_cfg, seed=0)
    t = np.full((batch,), 500, np.int32)
    fn = jax.jit(model.apply)
    return (lambda: fn(params, x, t)), fn.lower(params, x, t).compile().as_text()
  from drc_jax.targets import train as train_lib  # pylint: disable=g-import-not-at-top

  with config.unlocked():
    config.train.batch_size = batch
  _, model, params, schedule, tx = train_lib.build(config)
  from drc_jax.core import parallel  # pylint: disable=g-import-not-at-top

  step = train_lib.make_train_step(model, schedule, tx, config.train, parallel.make_mesh())
  holder = [train_lib.init_state(params, tx)]
  valid = np.ones((batch,), bool)
  key = jax.random.key(0)
  text = step.lower(holder[0], x, valid, key).compile().as_text()

  def run():  # the step donates its state: each call consumes the previous call's output
    holder[0], metrics = step(holder[0], x, valid, key)
    return metrics

  return run, text


class _Identity(nnx.Module):
  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __call__(self, x):
    return x


def _ablated_program(config, batch: int, train_step: bool, remove: str):
  """The program with ``remove`` ('', 'groupnorm', 'attention', 'silu', 'dropout') taken out."""
  saved = (model_lib.nnx.GroupNorm, model_lib.AttnBlock.__call__, model_lib.nnx.silu)
  config = copy.deepcopy(config)
  try:
    if remove == 'groupnorm':
      model_lib.nnx.GroupNorm = _Identity
    elif remove == 'attention':
      model_lib.AttnBlock.__call__ = lambda self, x: x
    elif remove == 'silu':
      model_lib.nnx.silu = lambda x: x
    elif remove == 'dropout':
      with config.unlocked():
        config.model.dropout = 0.0
    run, _ = _program(config, batch, train_step)
    for _ in range(2):  # trace and compile while the part is removed
      jax.block_until_ready(run())
  finally:
    model_lib.nnx.GroupNorm, model_lib.AttnBlock.__call__, model_lib.nnx.silu = saved
  return run


def ablate(config, batch: int, train_step: bool, repeats: int, rounds: int = 8) -> None:
  parts = ['', 'groupnorm', 'attention', 'silu'] + (['dropout'] if train_step else [])
  runs = {}
  for part in parts:
    runs[part] = _ablated_program(config, batch, train_step, part)
  times = {part: [] for part in parts}
  for _ in range(rounds):  # interleaved, so drifts of a shared machine hit every variant alike
    for part in parts:
      t0 = time.perf_counter()
      for _ in range(repeats):
        jax.block_until_ready(runs[part]())
      times[part].append((time.perf_counter() - t0) / repeats)
  med = {part: float(np.median(v)) for part, v in times.items()}
  full = med['']
  what = 'train step' if train_step else 'forward'
  print(f'UNet {what}, batch {batch}: {full * 1e3:.1f} ms per call (median of {rounds} rounds)\n')
  print('| removed | ms per call | saves | share |\n|---|---|---|---|')
  for part in parts[1:]:
    saves = full - med[part]
    print(f'| {part} | {med[part] * 1e3:.1f} | {saves * 1e3:.1f} ms | {saves / full:.0%} |')


def _kind(name: str, contents: dict[str, str]) -> str:
  if name in contents:
    return contents[name]
  n = name.lower()
  for kind in ('convolution', 'dot', 'reduce', 'transpose', 'copy', 'scatter', 'gather', 'sort'):
    if kind in n:
      return kind
  if 'fusion' in n:
    return 'fusion (element-wise, norms)'
  return re.sub(r'[.\d]+$', '', n) or n


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--config', default=config_base.DEFAULT_CONFIG)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--train_step', action='store_true')
  p.add_argument('--ablate', action='store_true', help='Time the program without each part.')
  args = p.parse_args()
  config = _load_config(args.config)
  if args.ablate:
    ablate(config, args.batch, args.train_step, args.repeats)
    return
  run, hlo_text = _program(config, args.batch, args.train_step)
  contents = _fusion_contents(hlo_text)
  for _ in range(2):  # compile (twice: a donated first state may differ in placement)
    jax.block_until_ready(run())
  t0 = time.perf_counter()
  for _ in range(args.repeats):
    jax.block_until_ready(run())
  wall = (time.perf_counter() - t0) / args.repeats
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.repeats):
        jax.block_until_ready(run())
    files = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events = [e for e in trace.get('traceEvents', []) if e.get('ph') == 'X' and 'dur' in e]
  # XLA operations: events named like HLO instructions (fusion.12, convolution.3, ...).
  hlo = [e for e in events if re.match(r'^[a-z][a-z_-]*(\.\d+)*$', e.get('name', ''))]
  by_kind = collections.Counter()
  by_op = collections.Counter()
  for e in hlo:
    by_kind[_kind(e['name'], contents)] += e['dur']
    by_op[e['name']] += e['dur']
  total = sum(by_kind.values()) or 1.0
  what = 'train step' if args.train_step else 'forward'
  print(
    f'UNet {what}, batch {args.batch}: {wall * 1e3:.1f} ms per call (wall, {jax.default_backend()})'
  )
  print(f'XLA operations traced: {len(hlo)} events, {total / args.repeats / 1e3:.1f} ms per call\n')
  print('| operation kind | ms per call | share |\n|---|---|---|')
  for kind, dur in by_kind.most_common():
    print(f'| {kind} | {dur / args.repeats / 1e3:.2f} | {dur / total:.0%} |')
  print('\n| costliest operations | ms per call |\n|---|---|')
  for name, dur in by_op.most_common(10):
    print(f'| {name} ({contents.get(name, "-")}) | {dur / args.repeats / 1e3:.2f} |')


if __name__ == '__main__':
  main()
