"""The codebase's structural rules: where ``jax.jit`` may appear, module size, the README's module
table, and config validation reading the registries the code runs from."""

import os
import re

import pytest

from drc_jax import attacks, compare, config_base, degrade, restore, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, 'drc_jax')
# Program boundaries (each jits its programs once, with shardings), the face detector (a host
# program run before the audit) and the conveniences of loaded objects (Target.apply,
# Encoder.embed); every other module returns pure functions.
JIT_ALLOWED = {
  'audit.py',
  'train.py',
  'bench.py',
  'sweep.py',
  'steps_curve.py',
  'target.py',
  'encoders.py',
  'faces.py',
}
MAX_LINES = 600


def _modules() -> list[str]:
  out = []
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        out.append(os.path.relpath(os.path.join(root, f), PKG))
  return sorted(out)


def test_jit_only_at_program_boundaries():
  offenders = []
  for rel in _modules():
    text = open(os.path.join(PKG, rel)).read()
    code = re.sub(r'(""".*?"""|#[^\n]*)', '', text, flags=re.S)  # docstrings and comments
    if re.search(r'\bjax\.jit\b|\bnnx\.jit\b|@jit\b', code) and rel not in JIT_ALLOWED:
      offenders.append(rel)
  assert not offenders, f'jax.jit outside the program boundaries: {offenders}'


def test_no_function_attributes_and_no_module_over_the_limit():
  for rel in _modules():
    text = open(os.path.join(PKG, rel)).read()
    assert '.jitted' not in text, rel
    n = text.count('\n')
    assert n <= MAX_LINES, f'drc_jax/{rel} has {n} lines (limit {MAX_LINES})'


def test_readme_module_table_matches_the_tree():
  readme = open(os.path.join(REPO, 'README.md')).read()
  start = readme.index('| module (under `drc_jax/`) | role |')
  table = readme[start : readme.index('\n\n', start)]
  listed = set()
  for row in table.splitlines()[2:]:
    first = row.split('|')[1]
    listed |= set(re.findall(r'`([\w/]+\.py)`', first))
  modules = {m for m in _modules() if not m.endswith(('__init__.py', '__main__.py'))}
  assert listed == modules, (
    f'README table lacks {sorted(modules - listed)}; lists missing {sorted(listed - modules)}'
  )


def test_validation_reads_the_registries():
  assert set(validate.RESTORERS) == set(restore.RESTORERS) == {'ddim', 'ddnm', 'repaint'}
  assert set(validate.MASKS) == set(degrade.MASKS)
  assert set(validate.COMPARATORS) == set(compare.COMPARATORS)
  assert set(validate.ATTACKS) == set(attacks.ATTACKS)
  assert set(attacks.ATTACKS) == {'drc', 'loss', 'secmi', 'pia', 'pian', 'sima'}


@pytest.mark.parametrize(
  'arg, want',
  [
    ('runlocal', True),
    ('runlocal=true', True),
    ('runlocal=1', True),
    ('runlocal=no', False),
    ('runlocal=False', False),
  ],
)
def test_parse_arg_booleans(arg, want):
  assert config_base.parse_arg(arg, runlocal=False).runlocal is want


@pytest.mark.parametrize(
  'arg, match',
  [
    ('runlocal=ture', "runlocal='ture': expected a boolean"),
    ('runlocl', "unknown config argument 'runlocl'"),
    ('res=abc', "res='abc': expected int"),
  ],
)
def test_parse_arg_refuses_typos(arg, match):
  with pytest.raises(ValueError, match=match):
    config_base.parse_arg(arg, runlocal=False, res=32)
