"""The batch-job launchers in launch/: syntax, dry runs, required variables, and quoting end to end.

gcloud, sbatch and srun are replaced by stubs on PATH: in dry runs, stubs that fail the test when
called; in the end-to-end tests, stubs that run the remote and batch commands here (ssh runs the
command in a fake home, sbatch runs the batch script, srun runs the step once) and a stub python
that records its working directory, environment and arguments, so the test sees exactly what
drc_jax.main would receive on a worker.
"""

import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / 'launch'
LAUNCHER_VARS = (
  'TPU_NAME',
  'ZONE',
  'ACCELERATOR_TYPE',
  'PROJECT',
  'WORKDIR',
  'CONFIG',
  'RUNTIME_VERSION',
  'CREATE_FLAGS',
  'REPO_URL',
  'REPO_REF',
  'REMOTE_DIR',
  'NODES',
  'GPUS_PER_NODE',
  'PARTITION',
  'ACCOUNT',
  'TIME',
  'VENV',
  'LAYOUT',
  'JOB_NAME',
  'LOG_DIR',
  'SBATCH_FLAGS',
  'DRC_JAX_DRY_RUN',
)
TPU_ENV = {
  'TPU_NAME': 'drc-v5e-16',
  'ZONE': 'us-west4-a',
  'ACCELERATOR_TYPE': 'v5litepod-16',
  'PROJECT': 'my-project',
  'WORKDIR': 'gs://my-bucket/drc/celeba',
}
SLURM_ENV = {
  'WORKDIR': '/shared/runs/celeba',
  'CONFIG': 'configs/celeba.py',
  'NODES': '4',
  'GPUS_PER_NODE': '8',
}
EXTRA = ['--mode=audit', '--config.audit.batch_size=256']

# Records one call: working directory, the two multi-host variables, then argv; NUL-separated.
# Written under another name, then renamed: a test polling for a detached job's call never reads a
# half-written one.
STUB_PYTHON = r"""#!/usr/bin/env bash
f=$(mktemp "$STUB_CALLS/partial.XXXXXX")
printf '%s\0' "$PWD" "${DRC_JAX_DISTRIBUTED-}" "${JAX_LOCAL_DEVICE_IDS-}" "$@" > "$f"
mv "$f" "${f/partial./call.}"
"""
FAIL_STUB = '#!/usr/bin/env bash\ntouch "$STUB_CALLS/called-$(basename "$0")"\nexit 97\n'
FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm {describe,scp,ssh} on one fake worker whose home is $FAKE_HOME.
set -euo pipefail
shift 3
case $1 in
  describe) echo READY ;;
  scp) cp "$2" "$FAKE_HOME/${3#*:}" ;;
  ssh)
    for a in "$@"; do
      if [[ $a == --command=* ]]; then cd "$FAKE_HOME" && exec bash -c "${a#--command=}"; fi
    done
    exit 98 ;;
  *) exit 99 ;;
esac
"""
FAKE_SBATCH = r"""#!/usr/bin/env bash
# Runs the batch script once, in --chdir, like sbatch would on the first node of the job.
set -euo pipefail
dir=$PWD
while [[ $1 == -* ]]; do
  [[ $1 == --chdir=* ]] && dir=${1#--chdir=}
  shift
done
cd "$dir"
SLURM_JOB_ID=42 exec bash "$@"
"""
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""


def _stubs(tmp_path, **scripts) -> tuple[pathlib.Path, pathlib.Path]:
  bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls'
  bin_dir.mkdir(exist_ok=True)
  calls.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir, calls


def _run(script, args=(), env=None, path_prefix=None, calls=None, cwd=REPO):
  base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
  if path_prefix is not None:
    base['PATH'] = f'{path_prefix}{os.pathsep}{base["PATH"]}'
  if calls is not None:
    base['STUB_CALLS'] = str(calls)
  base.update(env or {})
  return subprocess.run(
    ['bash', str(LAUNCH / script), *args],
    env=base,
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )


def _calls(calls: pathlib.Path) -> list[dict]:
  """The stub python calls of drc_jax.main: cwd, env and the flags after `-m drc_jax.main`."""
  out = []
  for f in sorted(calls.glob('call.*')):
    cwd, distributed, device_ids, *argv = f.read_bytes().decode().split('\0')[:-1]
    if argv[:2] == ['-m', 'drc_jax.main']:
      out.append(
        {'cwd': cwd, 'distributed': distributed, 'device_ids': device_ids, 'flags': argv[2:]}
      )
  return out


@pytest.mark.parametrize(
  'script',
  [
    'local.sh',
    'tpu_vm.sh',
    'slurm.sh',
    'slurm.sbatch',
    'bench_vs_peer.sh',
    'bench_train_vs_peer.sh',
    'bench_gpu.sh',
  ],
)
def test_scripts_parse(script):
  r = subprocess.run(
    ['bash', '-n', str(LAUNCH / script)], capture_output=True, text=True, check=False
  )
  assert r.returncode == 0, r.stderr
  assert 'set -euo pipefail' in (LAUNCH / script).read_text()


def _no_tool_called(tmp_path):
  return _stubs(tmp_path, gcloud=FAIL_STUB, sbatch=FAIL_STUB, srun=FAIL_STUB)


def test_tpu_vm_dry_run_prints_every_step_and_runs_none(tmp_path):
  bin_dir, calls = _no_tool_called(tmp_path)
  r = _run('tpu_vm.sh', ['--dry-run', '--create', '--', *EXTRA], TPU_ENV, bin_dir, calls)
  assert r.returncode == 0, r.stderr
  assert not list(calls.iterdir()), 'a dry run called gcloud'
  lines = [l for l in r.stdout.splitlines() if l.startswith('+ ')]
  assert [l.split()[1:5] for l in lines if 'gcloud' in l] == [
    ['gcloud', 'compute', 'tpus', 'tpu-vm']
  ] * 5
  assert 'tpu-vm create drc-v5e-16' in r.stdout
  assert '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite' in r.stdout
  assert 'pip install -q -e ".[tpu,gcs]"' in r.stdout
  job = lines[-1]
  assert '--worker=all' in job and '--zone=us-west4-a' in job and '--project=my-project' in job
  for part in (
    'DRC_JAX_DISTRIBUTED=1',
    'python -m drc_jax.main',
    '--config=configs/celeba.py',
    '--workdir=gs://my-bucket/drc/celeba',
    ' '.join(EXTRA),
  ):
    assert part in job


def test_tpu_vm_dry_run_clone_and_variant(tmp_path):
  bin_dir, calls = _no_tool_called(tmp_path)
  env = dict(
    TPU_ENV, CONFIG='configs/fashion_mnist.py:runlocal', REPO_URL='https://x/drc.git', REPO_REF='v1'
  )
  r = _run('tpu_vm.sh', ['--dry-run', '--detach'], env, bin_dir, calls)
  assert r.returncode == 0, r.stderr
  assert not list(calls.iterdir())
  assert 'git clone -q https://x/drc.git drc_jax' in r.stdout
  assert 'fetch -q origin v1' in r.stdout
  assert 'tpu-vm scp' not in r.stdout and 'tpu-vm create' not in r.stdout
  job = r.stdout.splitlines()[-1]
  assert 'nohup env DRC_JAX_DISTRIBUTED=1 .venv/bin/python -m drc_jax.main' in job
  assert '--config=configs/fashion_mnist.py:runlocal' in job


@pytest.mark.parametrize('var', ['TPU_NAME', 'ZONE', 'ACCELERATOR_TYPE', 'PROJECT', 'WORKDIR'])
def test_tpu_vm_missing_variable_is_named(var):
  env = {k: v for k, v in TPU_ENV.items() if k != var}
  r = _run('tpu_vm.sh', ['--dry-run'], env)
  assert r.returncode != 0
  assert f'{var}: set {var}' in r.stderr


def test_tpu_vm_refuses_a_workdir_the_workers_do_not_share():
  r = _run('tpu_vm.sh', ['--dry-run'], dict(TPU_ENV, WORKDIR='runs/celeba'))
  assert r.returncode != 0 and 'gs://' in r.stderr


def test_tpu_vm_end_to_end_quoting(tmp_path):
  """Over a previous copy: new code, venv kept, the worker's argv; attached, then detached."""
  # python3.13 answers the workers' Python version check without starting a real interpreter.
  bin_dir, calls = _stubs(tmp_path, gcloud=FAKE_GCLOUD, **{'python3.13': '#!/bin/sh\n'})
  home = tmp_path / 'home'
  venv_bin = home / 'drc_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  (venv_bin / 'python').write_text(STUB_PYTHON)
  (venv_bin / 'python').chmod(0o755)
  (home / 'drc_jax' / 'pyproject.toml').write_text('[project]\nname = "drc_jax"\n')  # a copy
  (home / 'drc_jax' / 'stale.py').write_text('')  # deleted from the repository since
  extra = ['--config.note=it\'s "quoted" $HOME', '--mode=audit']
  env = dict(
    TPU_ENV,
    WORKDIR='gs://b/run one',
    CONFIG='configs/fashion_mnist.py:runlocal',
    FAKE_HOME=str(home),
    TMPDIR=str(tmp_path),
  )
  for options in ([], ['--detach']):
    r = _run('tpu_vm.sh', [*options, '--', *extra], env, bin_dir, calls)
    assert r.returncode == 0, r.stdout + r.stderr
  for _ in range(100):  # the detached job runs in the background
    if len(_calls(calls)) == 2:
      break
    time.sleep(0.02)
  assert 'started, log in' in r.stdout and (home / 'drc_jax' / 'runs' / 'drc_jax.log').exists()
  assert (home / 'drc_jax' / 'drc_jax' / 'main.py').is_file()
  assert (venv_bin / 'python').is_file()
  assert not (home / 'drc_jax' / 'stale.py').exists()
  assert not (home / 'drc_jax_src.tar.gz').exists()
  assert (
    _calls(calls)
    == [
      {
        'cwd': str(home / 'drc_jax'),
        'distributed': '1',
        'device_ids': '',
        'flags': ['--config=configs/fashion_mnist.py:runlocal', '--workdir=gs://b/run one', *extra],
      }
    ]
    * 2
  )


def test_tpu_vm_end_to_end_clone(tmp_path):
  """REPO_URL: the workers' clone is moved to REPO_REF; its virtual environment is kept."""
  git = [
    'git',
    '-c',
    'user.name=t',
    '-c',
    'user.email=t@t',
    '-c',
    'init.defaultBranch=main',
    '-c',
    'commit.gpgsign=false',
    '-c',
    'tag.gpgsign=false',
  ]
  origin = tmp_path / 'origin'
  subprocess.run([*git, 'init', '-q', str(origin)], check=True)
  for version in ('v1', 'v2'):  # the workers' clone starts at v2
    (origin / 'version.txt').write_text(version)
    for args in (['add', '.'], ['commit', '-qm', version], ['tag', version]):
      subprocess.run([*git, '-C', str(origin), *args], check=True)
  home = tmp_path / 'home'
  subprocess.run([*git, 'clone', '-q', str(origin), str(home / 'drc_jax')], check=True)
  venv_bin = home / 'drc_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  (venv_bin / 'python').write_text(STUB_PYTHON)
  (venv_bin / 'python').chmod(0o755)
  bin_dir, calls = _stubs(tmp_path, gcloud=FAKE_GCLOUD, **{'python3.13': '#!/bin/sh\n'})
  env = dict(TPU_ENV, REPO_URL=str(origin), REPO_REF='v1', FAKE_HOME=str(home))
  r = _run('tpu_vm.sh', [], env, bin_dir, calls)
  assert r.returncode == 0, r.stdout + r.stderr
  assert (home / 'drc_jax' / 'version.txt').read_text() == 'v1'
  assert [c['cwd'] for c in _calls(calls)] == [str(home / 'drc_jax')]


def test_tpu_vm_does_not_replace_a_foreign_directory(tmp_path):
  bin_dir, calls = _stubs(tmp_path, gcloud=FAKE_GCLOUD)
  home = tmp_path / 'home'
  (home / 'notes').mkdir(parents=True)
  (home / 'notes' / 'keep.txt').write_text('mine')
  env = dict(TPU_ENV, REMOTE_DIR='notes', FAKE_HOME=str(home), TMPDIR=str(tmp_path))
  r = _run('tpu_vm.sh', [], env, bin_dir, calls)
  assert r.returncode != 0 and 'not a drc_jax copy' in r.stderr
  assert (home / 'notes' / 'keep.txt').read_text() == 'mine'


def test_slurm_dry_run_prints_sbatch_and_step(tmp_path):
  bin_dir, calls = _no_tool_called(tmp_path)
  env = dict(SLURM_ENV, PARTITION='gpu', ACCOUNT='acct', VENV='/shared/venv')
  r = _run('slurm.sh', ['--dry-run', '--', *EXTRA], env, bin_dir, calls)
  assert r.returncode == 0, r.stderr
  assert not list(calls.iterdir()), 'a dry run called sbatch or srun'
  sbatch = next(l for l in r.stdout.splitlines() if l.startswith('+ sbatch '))
  for part in (
    '--nodes=4',
    '--ntasks-per-node=8',
    '--gpus-per-node=8',
    '--partition=gpu',
    '--account=acct',
    f'--chdir={REPO}',
    f'{LAUNCH}/slurm.sbatch ' + ' '.join(EXTRA),
  ):
    assert part in sbatch
  step = r.stdout.splitlines()[-1]
  assert step.startswith('+ srun ')
  for part in (
    'DRC_JAX_DISTRIBUTED=1',
    '/shared/venv/bin/python -m drc_jax.main',
    '--config=configs/celeba.py',
    '--workdir=/shared/runs/celeba',
    ' '.join(EXTRA),
  ):
    assert part in step


def test_slurm_dry_run_one_task_per_node(tmp_path):
  r = _run('slurm.sh', ['--dry-run'], dict(SLURM_ENV, LAYOUT='node', GPUS_PER_NODE='4'))
  assert r.returncode == 0, r.stderr
  assert '--ntasks-per-node=1 --gpus-per-node=4' in r.stdout
  assert 'env DRC_JAX_DISTRIBUTED=1 JAX_LOCAL_DEVICE_IDS=0,1,2,3 python -m drc_jax.main' in r.stdout


@pytest.mark.parametrize('var', ['WORKDIR', 'CONFIG', 'NODES', 'GPUS_PER_NODE'])
def test_slurm_missing_variable_is_named(var):
  env = {k: v for k, v in SLURM_ENV.items() if k != var}
  r = _run('slurm.sh', ['--dry-run'], env)
  assert r.returncode != 0
  assert f'{var}: set {var}' in r.stderr


def test_slurm_rejects_bad_counts():
  r = _run('slurm.sh', ['--dry-run'], dict(SLURM_ENV, NODES='two'))
  assert r.returncode != 0 and 'NODES=two' in r.stderr


@pytest.mark.parametrize('layout', ['gpu', 'node'])
def test_slurm_end_to_end_quoting(tmp_path, layout):
  """sbatch -> slurm.sbatch -> srun -> python, with a relative workdir made absolute."""
  bin_dir, calls = _stubs(tmp_path, sbatch=FAKE_SBATCH, srun=FAKE_SRUN, python=STUB_PYTHON)
  extra = ['--config.note=it\'s "quoted" $HOME']
  env = dict(
    SLURM_ENV, WORKDIR='my runs/x', GPUS_PER_NODE='2', LAYOUT=layout, LOG_DIR=str(tmp_path / 'logs')
  )
  r = _run('slurm.sh', ['--', *extra], env, bin_dir, calls, cwd=tmp_path)
  assert r.returncode == 0, r.stdout + r.stderr
  assert (tmp_path / 'logs').is_dir()
  assert _calls(calls) == [
    {
      'cwd': str(REPO),
      'distributed': '1',
      'device_ids': '0,1' if layout == 'node' else '',
      'flags': ['--config=configs/celeba.py', f'--workdir={tmp_path}/my runs/x', *extra],
    }
  ]


def test_sbatch_script_alone_checks_variables_and_dry_runs():
  r = _run('slurm.sbatch', [], {'CONFIG': 'configs/celeba.py'})
  assert r.returncode != 0 and 'WORKDIR: set WORKDIR' in r.stderr
  r = _run('slurm.sbatch', ['--mode=report'], dict(SLURM_ENV, DRC_JAX_DRY_RUN='1'))
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == (
    '+ srun --kill-on-bad-exit=1 env DRC_JAX_DISTRIBUTED=1 python -m '
    'drc_jax.main --config=configs/celeba.py '
    '--workdir=/shared/runs/celeba --mode=report'
  )


def test_gpu_bench_peaks_and_table():
  """launch/bench_gpu.py's peak lookup and table (the run itself needs a GPU to mean anything)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location('bench_gpu', LAUNCH / 'bench_gpu.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4
  assert mod.peak_tflops('NVIDIA H200', 'float32') == 494.7
  assert mod.peak_tflops('cpu', 'float32') is None
  row = dict(
    dtype='bfloat16',
    batch=64,
    forward_images_per_s=5000.0,
    tflops=98.94,
    fraction_of_peak=0.1,
    repaint_images_per_s=60.0,
  )
  doc = {
    'device': 'NVIDIA H100 80GB HBM3',
    'jax': '0.x',
    'backend': 'gpu',
    'repaint': {'steps': 50, 'jump_length': 10, 'jump_n_sample': 2},
    'drc_jax': [row, dict(row, batch=256, fraction_of_peak=None)],
    'peer': [
      {'dtype': 'bfloat16', 'batch': 64, 'images_per_s': 20.0},
      {'dtype': 'bfloat16', 'batch': 256, 'error': 'CUDA out of memory'},
    ],
  }
  table = mod.format_table(doc)
  assert '| bfloat16 | 64 | 5000.0 | 98.94 | 10.0% | 60.00 | 20.00 | 3.00x |' in table
  assert '| bfloat16 | 256 | 5000.0 | 98.94 | n/a | 60.00 | n/a | n/a |' in table
  assert 'diffusers failed at bfloat16, batch 256: CUDA out of memory' in table


def _preload(tmp_path, env, script='drc_jax_preload_tcmalloc; echo "[${LD_PRELOAD:-}]"'):
  r = subprocess.run(
    ['bash', '-c', f'set -euo pipefail; source {LAUNCH / "tcmalloc.sh"}; {script}'],
    capture_output=True,
    text=True,
    env={'PATH': os.environ['PATH'], **env},
    check=False,
  )
  assert r.returncode == 0, r.stderr
  return r.stdout.strip(), r.stderr


def test_tcmalloc_preload(tmp_path):
  lib = tmp_path / 'libtcmalloc_minimal.so.4'
  lib.write_bytes(b'')
  assert _preload(tmp_path, {'TCMALLOC_LIB': str(lib)})[0] == f'[{lib}]'
  # after what is already preloaded; never twice; off with DRC_JAX_TCMALLOC=0
  out, _ = _preload(tmp_path, {'TCMALLOC_LIB': str(lib), 'LD_PRELOAD': '/x/libother.so'})
  assert out == f'[{lib} /x/libother.so]'
  out, _ = _preload(tmp_path, {'TCMALLOC_LIB': '/y/z', 'LD_PRELOAD': f'{lib}'})
  assert out == f'[{lib}]'
  assert _preload(tmp_path, {'TCMALLOC_LIB': str(lib), 'DRC_JAX_TCMALLOC': '0'})[0] == '[]'
  out, err = _preload(tmp_path, {'TCMALLOC_LIB': str(tmp_path / 'missing.so')})
  assert out == '[]' and 'missing.so does not exist' in err


def test_tcmalloc_is_what_the_launchers_run_drc_jax_on(tmp_path):
  """With the Debian package installed (launch/local.sh installs it), a preloaded process runs on
  tcmalloc, and bench reports it."""
  found = subprocess.run(
    ['bash', '-c', f'source {LAUNCH / "tcmalloc.sh"}; drc_jax_tcmalloc_path'],
    capture_output=True,
    text=True,
    check=False,
  )
  if found.returncode != 0:
    pytest.skip('libtcmalloc-minimal4 is not installed (launch/local.sh setup installs it)')
  py = f'{sys.executable} -c "from drc_jax.core import parallel; print(parallel.host_allocator())"'
  env = {'PYTHONPATH': str(LAUNCH.parent), 'JAX_PLATFORMS': 'cpu'}
  run = f'drc_jax_preload_tcmalloc; {py}'
  assert _preload(tmp_path, env, run)[0] == 'tcmalloc'
  assert _preload(tmp_path, {**env, 'DRC_JAX_TCMALLOC': '0'}, run)[0] == 'default'


def test_a_real_browser_shows_the_verdict_above_the_fold(tmp_path):
  """launch/report_screenshot.py: headless Chromium at desktop and phone widths."""
  sys.path.insert(0, str(LAUNCH))
  try:
    import report_screenshot  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(LAUNCH))
  if report_screenshot.find_browser() is None:
    if os.environ.get('DRC_JAX_REQUIRE_BROWSER'):
      pytest.fail('no Chromium, although launch/local.sh test installs chromium-headless-shell')
    pytest.skip('no Chromium (launch/local.sh test installs chromium-headless-shell)')
  sys.path.insert(0, str(REPO / 'tests' / 'audit'))
  try:
    import test_report  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(REPO / 'tests' / 'audit'))
  from drc_jax.audit import report  # pylint: disable=g-import-not-at-top

  table = test_report._synthetic_table()
  m = test_report._access(test_report._metrics(table))
  page = report.write_report(str(tmp_path), table, m, test_report._evidence(table, 3))
  run = [sys.executable, str(LAUNCH / 'report_screenshot.py')]
  done = subprocess.run(run + [page, f'--out={tmp_path}/shots'], capture_output=True, text=True)
  assert done.returncode == 0, done.stdout + done.stderr
  for name in ('desktop', 'phone'):
    assert f'{name} ' in done.stdout and 'verdict rows' in done.stdout
    assert (tmp_path / 'shots' / f'{name}.png').stat().st_size > 1000
  # A page whose verdict sits below a screen of other content fails the check.
  late = tmp_path / 'late.html'
  late.write_text(open(page).read().replace('<h1>', '<div style="height:3000px"></div><h1>', 1))
  done = subprocess.run(run + [str(late), f'--out={tmp_path}/late'], capture_output=True, text=True)
  assert done.returncode == 1 and 'not on the first screen' in done.stdout
