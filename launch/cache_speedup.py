"""Seconds from start to the first scored shard of the same ``:runlocal`` run, twice, each in a
new workdir, with the compilation cache empty before the first: what the persistent cache saves.

    .venv/bin/python launch/cache_speedup.py [--out=runs/cache_speedup]

Each run goes on to the end after its first shard (the times are those of the line
'scored shard 1/...'). Prints both times and their ratio.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_shard_seconds(out: str, name: str) -> float:
  cmd = [
    sys.executable,
    '-m',
    'drc_jax.main',
    f'--config={os.path.join(REPO, "configs", "fashion_mnist.py")}:runlocal',
    f'--workdir={os.path.join(out, name)}',
    f'--compilation_cache={os.path.join(out, "cache")}',
    '--config.audit.num_samples=0',
  ]
  start = time.perf_counter()
  proc = subprocess.Popen(
    cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
  )
  seconds = None
  for line in proc.stderr:
    if seconds is None and 'scored shard 1/' in line:
      seconds = time.perf_counter() - start
  if proc.wait() != 0 or seconds is None:
    raise SystemExit(f'{name}: the run failed or scored no shard')
  return seconds


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=os.path.join(REPO, 'runs', 'cache_speedup'))
  a = p.parse_args()
  shutil.rmtree(a.out, ignore_errors=True)
  first = first_shard_seconds(a.out, 'run1')
  second = first_shard_seconds(a.out, 'run2')
  print(
    f'first run: {first:.1f} s to the first scored shard; second run (cache warm): '
    f'{second:.1f} s; {first / second:.1f}x sooner'
  )


if __name__ == '__main__':
  main()
