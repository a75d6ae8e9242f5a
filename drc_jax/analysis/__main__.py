"""The analysis tools' one command line: ``python -m drc_jax.analysis TOOL [flags]``.

  python -m drc_jax.analysis sweep --config=configs/fashion_mnist.py --out=runs/sweep
  python -m drc_jax.analysis frontier --config=configs/fashion_mnist.py --out=runs/frontier
  python -m drc_jax.analysis steps-curve --config=C --workdir=W --steps=2000,4000 --out=runs/steps
  python -m drc_jax.analysis bench [--forward_only | --drc | --train_step | --encoders]
  python -m drc_jax.analysis export --config=C --workdir=W --step=N --out=DIR [--log=train.log]
  python -m drc_jax.analysis thresholds --workdir=W   # the shipped target's calibration scores
  python -m drc_jax.analysis black-box --out=runs/black_box --audit_workdir=runs/fashion_mnist
  python -m drc_jax.analysis drc-rules --workdir=runs/fashion_mnist   # DRC's mean/median/agree
  python -m drc_jax.analysis compare --workdir=W [--against=W2]   # attacks or audits, paired

Each tool defines only its own flags; ``TOOL --help`` lists them. Errors in what a user gives are
one line and exit status 2, as for ``python -m drc_jax.main``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from drc_jax.analysis import (
  bench,
  black_box,
  compare,
  drc_rules,
  export,
  frontier,
  steps_curve,
  sweep,
)
from drc_jax.core import config_base, errors, parallel
from drc_jax.targets import shipped

F = flags.FLAGS


def _grid_flags(default_out: str) -> None:
  """The flags of the sweep and the frontier (same image set, same selection rule)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).')
  flags.DEFINE_string('target', None, 'Target (default: config.audit.checkpoint).')
  flags.DEFINE_string('out', default_out, 'Output directory.')
  flags.DEFINE_integer('heldout_members', 0, 'Held-out members to use (0 = all).')
  flags.DEFINE_integer('heldout_nonmembers', 400, 'Held-out non-members to use (0 = all).')
  flags.DEFINE_float('tolerance', 0.01, 'Choose the cheapest setting within this AUC.')
  flags.DEFINE_integer('batch_size', 64, 'Images per restoration batch.')
  flags.DEFINE_string('only', '', 'Comma list of grid positions to run (default: all).')


def _frontier_flags() -> None:
  _grid_flags('runs/frontier')
  flags.DEFINE_string(
    'fresh_after',
    '',
    'No restoration: re-read the saved scores of the run in --frontier_run, choosing on every '
    "image an earlier run with --heldout_members,--heldout_nonmembers = 'M,N' scored and "
    'reporting on the held-out images it never scored.',
  )
  flags.DEFINE_string('frontier_run', '', '--fresh_after: the --out of the run to re-read.')


def _steps_curve_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).')
  flags.DEFINE_string('workdir', None, 'The training workdir whose checkpoints are audited.')
  flags.DEFINE_string('steps', '', 'Comma list of checkpoint steps.')
  flags.DEFINE_string('out', 'runs/steps_curve', 'Output directory.')
  flags.DEFINE_integer('drc_members', 128, 'Members DRC scores.')
  flags.DEFINE_integer('drc_nonmembers', 256, 'Non-members DRC scores.')
  flags.DEFINE_integer('batch_size', 64, 'Images per batch.')


def _bench_flags() -> None:
  config_flags.DEFINE_config_file(
    'config', config_base.DEFAULT_CONFIG, 'Config file (path[:variant]).', lock_config=True
  )
  flags.DEFINE_string('restorer', 'repaint', 'repaint, ddim or ddnm.')
  flags.DEFINE_integer('batch', 16, 'Global batch (images restored at once).')
  flags.DEFINE_integer('steps', 50, 'Reverse steps (RePaint: respaced steps).')
  flags.DEFINE_integer('jump_length', 10, 'RePaint jump length.')
  flags.DEFINE_integer('jump_n_sample', 2, 'RePaint samples per jump.')
  flags.DEFINE_integer(
    'repeats',
    2,
    f'Timed repetitions after the compile run (--train_step: steps, default '
    f'{bench.TRAIN_REPEATS}).',
  )
  flags.DEFINE_bool('forward_only', False, 'Time the UNet forward alone (one call per image).')
  flags.DEFINE_bool('encoders', False, "Also time DRC's encoders (config.drc.*_encoder) per image.")
  flags.DEFINE_bool('drc', False, "Time the config's whole DRC (K restorations) instead.")
  flags.DEFINE_bool(
    'train_step', False, 'Time one training step (config.train.batch_size) instead.'
  )


def _export_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'The config that trained the target.')
  flags.DEFINE_string(
    'config_path',
    'configs/fashion_mnist.py',
    'How the config is named in the recorded training command.',
  )
  flags.DEFINE_string('workdir', None, 'The training workdir.')
  flags.DEFINE_integer('step', None, 'The checkpoint step to ship (= config.train.steps).')
  flags.DEFINE_string('out', None, 'The shipped-target directory to write.')
  flags.DEFINE_string('log', '', 'The training log (its loss lines are summarised).')


def _require(*names: str) -> None:
  for name in names:
    if F[name].value is None:
      raise app.UsageError(f'--{name} is required')


def _run_grid(module) -> dict:
  grid = module.GRID
  if F.only:
    grid = [grid[int(i)] for i in F.only.split(',')]
  return module.run(
    F.config,
    F.target or F.config.audit.checkpoint,
    F.out,
    heldout_members=F.heldout_members,
    heldout_nonmembers=F.heldout_nonmembers,
    tolerance=F.tolerance,
    batch_size=F.batch_size,
    grid=grid,
  )


def _sweep() -> None:
  _require('config')
  doc = _run_grid(sweep)
  print(epath.Path(F.out, 'sweep.md').read_text())
  print(json.dumps({'chosen': doc['chosen'], 'best': doc['best']}, indent=1))


def _frontier() -> None:
  _require('config')
  if F.fresh_after:
    seen = tuple(v.strip() for v in F.fresh_after.split(','))
    if len(seen) != 2 or not all(v.isdigit() for v in seen):
      raise errors.UserError(f'--fresh_after={F.fresh_after!r}: expected M,N (two integers)')
    seen = (int(seen[0]), int(seen[1]))
    frontier.reread_fresh(F.config, F.frontier_run or F.out, F.out, seen)
    print(epath.Path(F.out, 'frontier_fresh.md').read_text())
    return
  _run_grid(frontier)
  print(epath.Path(F.out, 'frontier.md').read_text())


def _steps_curve() -> None:
  _require('config', 'workdir')
  steps_curve.steps_curve(
    F.config,
    F.workdir,
    [int(v) for v in F.steps.split(',')],
    F.out,
    drc_members=F.drc_members,
    drc_nonmembers=F.drc_nonmembers,
    batch_size=F.batch_size,
  )
  print(epath.Path(F.out, 'steps_curve.md').read_text())


def _bench() -> None:
  if F.train_step:
    repeats = F.repeats if F['repeats'].present else bench.TRAIN_REPEATS
    print(json.dumps(bench.run_train_bench(F.config, repeats)))
    return
  if F.drc:
    print(json.dumps(bench.run_drc_bench(F.config, F.batch, F.repeats)))
    return
  out = bench.run_bench(
    F.config,
    F.restorer,
    F.batch,
    F.steps,
    F.jump_length,
    F.jump_n_sample,
    F.repeats,
    F.forward_only,
  )
  if F.encoders:  # DRC's encoder calls and their time, next to the UNet's
    out['encoders'] = bench.run_encoder_bench(F.config, F.batch, F.repeats)
    out['unet_seconds_per_image'] = round(out['seconds'] / F.batch, 5)
  print(json.dumps(out))


def _export() -> None:
  _require('config', 'workdir', 'step', 'out')
  command = f'python -m drc_jax.main --config={F.config_path} --mode=train --workdir=W'
  doc = export.export(
    F.workdir, F.out, step=F.step, config=F.config, command=command, log_path=F.log
  )
  print(json.dumps({k: doc[k] for k in ('step', 'num_params', 'sha256')}, indent=1))


def _thresholds_flags() -> None:
  config_flags.DEFINE_config_file(
    'config', config_base.DEFAULT_CONFIG, 'The config the audit ran.', lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'The audit workdir of the target (its scores).')
  flags.DEFINE_string('target', None, 'Target directory (default: config.audit.checkpoint).')


def _thresholds() -> None:
  _require('workdir')
  target = shipped.resolve(F.target or F.config.audit.checkpoint)
  doc = export.write_thresholds(F.config, F.workdir, target)
  print(f'{target}/{shipped.THRESHOLDS_JSON}: {doc["n_nonmembers"]} calibration non-members')


def _black_box_flags() -> None:
  config_flags.DEFINE_config_file(
    'config', config_base.DEFAULT_CONFIG, 'Config file (path[:variant]).', lock_config=True
  )
  flags.DEFINE_string('out', 'runs/black_box', 'Output directory (one audit workdir per setting).')
  flags.DEFINE_string(
    'audit_workdir', '', "An audit of --config whose scores stand for the config's own settings."
  )
  flags.DEFINE_string('budgets', '', 'Comma list of model-call budgets (default: all).')


def _black_box() -> None:
  budgets = [int(b) for b in F.budgets.split(',')] if F.budgets else None
  black_box.run(F.config, F.out, F.audit_workdir, budgets)
  print(epath.Path(F.out, 'black_box.md').read_text())


def _drc_rules_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A finished audit workdir (its saved DRC similarities).')
  flags.DEFINE_string('out', 'runs/drc_rules', 'Output directory.')
  flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples of each interval.')


def _drc_rules() -> None:
  _require('workdir')
  drc_rules.run(F.workdir, F.out, bootstrap=F.bootstrap)
  print(epath.Path(F.out, 'drc_rules.md').read_text())


def _compare_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A finished audit workdir.')
  flags.DEFINE_string('against', '', 'A second audit of the same images: W minus it per attack.')
  flags.DEFINE_string('reference', 'drc', 'One workdir: the attack the others are compared with.')
  flags.DEFINE_string('attacks', '', 'Comma list of attacks (default: every one scored).')
  flags.DEFINE_string('out', 'runs/compare', 'Output directory.')
  flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples of each interval.')


def _compare() -> None:
  _require('workdir')
  compare.run(
    F.workdir,
    F.out,
    against=F.against,
    reference=F.reference,
    attacks=F.attacks,
    bootstrap=F.bootstrap,
  )
  print(epath.Path(F.out, 'compare.md').read_text())


# tool -> (define its flags, run it)
TOOLS: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
  'sweep': (lambda: _grid_flags('runs/sweep'), _sweep),
  'frontier': (_frontier_flags, _frontier),
  'steps-curve': (_steps_curve_flags, _steps_curve),
  'bench': (_bench_flags, _bench),
  'export': (_export_flags, _export),
  'thresholds': (_thresholds_flags, _thresholds),
  'black-box': (_black_box_flags, _black_box),
  'drc-rules': (_drc_rules_flags, _drc_rules),
  'compare': (_compare_flags, _compare),
}


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in TOOLS:
    print(__doc__.strip(), file=sys.stderr if len(argv) >= 2 else sys.stdout)
    if len(argv) >= 2 and argv[1] not in ('-h', '--help', 'help'):
      errors.exit_with(f'unknown tool {argv[1]!r}; one of {sorted(TOOLS)}')
    sys.exit(0)
  define, run = TOOLS[argv[1]]
  tool_argv = [f'{argv[0]} {argv[1]}', *argv[2:]]

  def define_all() -> None:
    define()
    flags.DEFINE_bool('verbose', False, 'Show the traceback of a user error.')

  errors.define_flags_reporting_errors(define_all, tool_argv)

  def tool_main(rest: list[str]) -> None:
    if len(rest) > 1:
      errors.exit_with(f'unexpected arguments {rest[1:]}: every option of {argv[1]} is a --flag')
    parallel.set_cpu_defaults()
    errors.run_reporting_user_errors(run, F.verbose)

  errors.run_app(tool_main, tool_argv)


if __name__ == '__main__':
  main()
