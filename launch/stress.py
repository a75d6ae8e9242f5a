"""Reliability under faults: kills, concurrent runs and damaged files, against a clean run.

    .venv/bin/python launch/stress.py --trials=20 --out=runs/stress

Trains the ``:runlocal`` target once, audits a copy of it cleanly (the reference), then runs
``--trials`` trials on fresh copies. Each trial takes one scenario, in turn:

* ``kill-audit``: an audit killed (SIGKILL) at a random moment, then run again;
* ``two-audits``: two audits of one workdir started together, then the command run again;
* ``kill-dataset``: a dataset-mode run killed at a random moment, then run again;
* ``kill-report``: a report-mode run killed at a random moment, then run again;

then damages one random file of the workdir (one flipped byte) and runs the audit again. Every
run must end in one of two ways: metrics identical to the clean run's, or exit status 2 with one
``error:`` line naming the damaged file or what it holds. Anything else (another number, a
traceback, a hang) is a failure. Prints the tally and writes ``stress.json``.
"""

import argparse
import collections
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'fashion_mnist.py') + ':runlocal'
SCENARIOS = ('kill-audit', 'two-audits', 'kill-dataset', 'kill-report')
TIMEOUT = 600
# Compiled programs are cached across the runs (the runs measure faults, not compile time).
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, 'runs', 'stress_jax_cache'))


def _main(workdir: str, *flags: str, wait: bool = True):
  cmd = [
    sys.executable,
    '-m',
    'drc_jax.main',
    f'--config={CONFIG}',
    f'--workdir={workdir}',
    '--config.audit.num_samples=0',
    *flags,
  ]
  proc = subprocess.Popen(
    cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
  )
  if not wait:
    return proc
  out, err = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out, err


def _kill_later(proc, seconds: float) -> None:
  try:
    proc.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _metrics(workdir: str) -> dict:
  m = json.loads(pathlib.Path(workdir, 'metrics.json').read_text())
  keys = ('auc', 'asr', 'tpr_at_1pct_fpr', 'tpr_at_0p1pct_fpr')
  return {a: {k: v.get(k) for k in keys} for a, v in m.items() if isinstance(v, dict)}


def _damage(workdir: str, rng: random.Random) -> str:
  """Changes one byte of a random file of the workdir; returns its path relative to it. The kind
  of file is drawn first (score shards, checkpoint files, the JSON records, the report), so the
  many small files of a checkpoint do not take most draws."""
  kinds = collections.defaultdict(list)
  for root, _, names in os.walk(workdir):
    for f in names:
      if f.startswith('.'):
        continue
      rel = os.path.relpath(os.path.join(root, f), workdir)
      kinds[rel.split(os.sep)[0] if os.sep in rel else rel].append(os.path.join(root, f))
  path = rng.choice(sorted(kinds[rng.choice(sorted(kinds))]))
  data = bytearray(pathlib.Path(path).read_bytes())
  if data:
    i = rng.randrange(len(data))
    data[i] = (data[i] + rng.randrange(1, 256)) % 256
  pathlib.Path(path).write_bytes(bytes(data))
  return os.path.relpath(path, workdir)


def _outcome(result, workdir: str, clean: dict | None) -> str:
  """'identical' (metrics equal to ``clean``; 'completed' when None), 'one-line error', or a
  failure."""
  rc, _, err = result
  errors = [ln for ln in err.splitlines() if ln.startswith('error: ')]
  if rc == 0:
    if clean is None:
      return 'completed'
    return 'identical' if _metrics(workdir) == clean else 'DIFFERENT NUMBERS'
  if rc == 2 and len(errors) == 1 and 'Traceback' not in err:
    return 'one-line error'
  return f'CRASH (exit {rc})'


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--trials', type=int, default=20)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=os.path.join(REPO, 'runs', 'stress'))
  a = p.parse_args()
  rng = random.Random(a.seed)
  shutil.rmtree(a.out, ignore_errors=True)
  base, clean_wd = os.path.join(a.out, 'target'), os.path.join(a.out, 'clean')
  t0 = time.time()
  rc, _, err = _main(base, '--mode=train')
  assert rc == 0, err[-3000:]
  shutil.copytree(base, clean_wd)
  rc, _, err = _main(clean_wd, '--mode=audit')
  assert rc == 0, err[-3000:]
  clean = _metrics(clean_wd)
  print(f'clean run ready in {time.time() - t0:.0f} s', flush=True)
  trials, tally = [], collections.Counter()
  for t in range(a.trials):
    scenario = SCENARIOS[t % len(SCENARIOS)]
    wd = os.path.join(a.out, f'trial_{t:02d}')
    shutil.copytree(base, wd)
    runs = []
    if scenario == 'kill-audit':
      _kill_later(_main(wd, '--mode=audit', wait=False), rng.uniform(5, 40))
    elif scenario == 'two-audits':
      first = _main(wd, '--mode=audit', wait=False)
      time.sleep(rng.uniform(0, 5))
      second = _main(wd, '--mode=audit', '--config.attacks.loss_t=300', '--overwrite', wait=False)
      for proc in (first, second):  # one runs (loss_t differs: no clean figure), one is refused
        out, err = proc.communicate(timeout=TIMEOUT)
        runs.append(('concurrent', _outcome((proc.returncode, out, err), wd, None)))
    elif scenario == 'kill-dataset':
      _main(wd, '--mode=audit')
      _kill_later(
        _main(
          wd,
          '--mode=dataset',
          '--config.dataset.suspect=members',
          '--config.dataset.size=5',
          wait=False,
        ),
        rng.uniform(3, 30),
      )
    else:  # kill-report
      _main(wd, '--mode=audit')
      _kill_later(_main(wd, '--mode=report', wait=False), rng.uniform(3, 20))
    runs.append(('rerun', _outcome(_main(wd, '--mode=audit'), wd, clean)))
    damaged = _damage(wd, rng)
    runs.append((f'damaged {damaged}', _outcome(_main(wd, '--mode=audit'), wd, clean)))
    for _, outcome in runs:
      tally[outcome] += 1
    trials.append({'trial': t, 'scenario': scenario, 'runs': runs})
    print(json.dumps(trials[-1]), flush=True)
  doc = {'trials': trials, 'tally': dict(tally), 'seconds': round(time.time() - t0)}
  with open(os.path.join(a.out, 'stress.json'), 'w') as f:
    json.dump(doc, f, indent=1)
  print('tally:', json.dumps(dict(tally)))
  bad = sum(n for k, n in tally.items() if k not in ('identical', 'completed', 'one-line error'))
  sys.exit(1 if bad else 0)


if __name__ == '__main__':
  main()
