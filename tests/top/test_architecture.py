"""The codebase's structural rules: the layers and their imports, where ``jax.jit`` may appear,
module size, the architecture document's module table, packaging, an import without side effects,
and config validation reading the registries the code runs from."""

import ast
import os
import re
import subprocess
import sys
import tomllib

import pytest

from drc_jax.attacks import registry as attacks
from drc_jax.audit import validate
from drc_jax.core import config_base
from drc_jax.drc import compare, degrade, restore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(REPO, 'drc_jax')
# Program boundaries (each jits its programs once, with shardings), the face detector (a host
# program run before the audit) and the conveniences of loaded objects (Target.apply,
# Encoder.embed); every other module returns pure functions.
JIT_ALLOWED = {
  'audit/scoring.py',
  'targets/train.py',
  'analysis/bench.py',
  'analysis/sweep.py',
  'analysis/steps_curve.py',
  'targets/load.py',
  'targets/encoders.py',
  'drc/faces.py',
  'core/export_cache.py',
}
MAX_LINES = 600
# The layers, lowest first: a module imports its own layer and the ones below. The package's
# top (``drc_jax/__init__.py``, ``api.py``, ``main.py``) sits above them all.
LAYERS = ('core', 'models', 'data', 'targets', 'convert', 'drc', 'attacks', 'audit', 'analysis')
TOP = len(LAYERS)
# Imports allowed inside functions: optional or heavy dependencies that most runs never need.
LAZY_IMPORTS = ('torch', 'tensorflow_datasets', 'matplotlib', 'yaml', 'scipy')


def _modules() -> list[str]:
  out = []
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith('.py'):
        out.append(os.path.relpath(os.path.join(root, f), PKG))
  return sorted(out)


def _name(rel: str) -> str:
  parts = ['drc_jax', *rel[:-3].split(os.sep)]
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _layer(module: str) -> int:
  parts = module.split('.')
  return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def _import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
  """{module: drc_jax modules it imports at run time} and the (module, import) pairs made inside
  a function. ``if TYPE_CHECKING:`` imports are for type checkers only and do not count."""
  names = {_name(rel): rel for rel in _modules()}

  def resolve(dotted: str) -> str | None:
    while dotted and dotted not in names:
      dotted = dotted.rpartition('.')[0]
    return dotted or None

  graph, inside = {}, []
  for module, rel in names.items():
    tree = ast.parse(open(os.path.join(PKG, rel)).read())
    skip = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test):
        skip |= {id(n) for n in ast.walk(node)}
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for n in ast.walk(node):
          if isinstance(n, (ast.Import, ast.ImportFrom)):
            for target in [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module]:
              inside.append((module, target or ''))
    deps = set()
    for node in ast.walk(tree):
      if id(node) in skip:
        continue
      if isinstance(node, ast.Import):
        deps |= {resolve(a.name) for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        deps |= {resolve(f'{node.module}.{a.name}') or resolve(node.module) for a in node.names}
    graph[module] = {d for d in deps if d and d != module}
  return graph, inside


def test_the_import_graph_has_no_cycle():
  graph, _ = _import_graph()
  state, path = {}, []

  def visit(m):
    state[m] = 'open'
    path.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(d) :] + [d]))
      if d not in state:
        visit(d)
    path.pop()
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_layers_import_downward():
  graph, _ = _import_graph()
  upward = sorted((m, d) for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
  assert not upward, f'imports running up a layer ({LAYERS}): {upward}'


def test_no_import_inside_a_function_but_optional_heavy_ones():
  _, inside = _import_graph()
  bad = [(m, t) for m, t in inside if t.split('.')[0] not in LAZY_IMPORTS]
  assert not bad, f'imports inside functions (only {LAZY_IMPORTS} may be): {bad}'


def test_import_leaves_the_environment_unchanged():
  code = (
    'import os, json; before = dict(os.environ); import drc_jax; drc_jax.load_target; '
    'print(json.dumps(dict(os.environ) == before))'
  )
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True
  )
  assert out.stdout.strip() == 'true', out.stderr[-2000:]


def test_pyproject_lists_every_package_and_ships_the_configs():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    tool = tomllib.load(f)['tool']['setuptools']
  tree = {_name(rel) for rel in _modules() if rel.endswith('__init__.py')}
  assert set(tool['packages']) == tree | {'drc_jax.configs'}
  assert tool['package-dir'] == {'drc_jax.configs': 'configs'}
  assert os.path.exists(os.path.join(REPO, 'configs', '__init__.py'))
  assert os.path.join(REPO, 'configs', 'fashion_mnist.py') == config_base.DEFAULT_CONFIG


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


def test_architecture_doc_module_table_matches_the_tree():
  doc = open(os.path.join(REPO, 'docs', 'architecture.md')).read()
  start = doc.index('| module (under `drc_jax/`) | role |')
  table = doc[start : doc.index('\n\n', start)]
  listed = set()
  for row in table.splitlines()[2:]:
    first = row.split('|')[1]
    listed |= set(re.findall(r'`([\w/]+\.py)`', first))
  modules = {m for m in _modules() if not m.endswith(('__init__.py', '__main__.py'))}
  assert listed == modules, (
    f'docs/architecture.md lacks {sorted(modules - listed)}; '
    f'lists missing {sorted(listed - modules)}'
  )


def test_tests_mirror_the_subpackages():
  """tests/<layer>/ for each layer with modules of its own; no test module at the top."""
  for layer in (*LAYERS, 'top'):
    assert os.path.isdir(os.path.join(REPO, 'tests', layer)), layer
  top = [f for f in os.listdir(os.path.join(REPO, 'tests')) if f.startswith('test_')]
  assert not top, f'tests outside a subpackage folder: {top}'


def test_validation_reads_the_registries():
  assert set(validate.RESTORERS) == set(restore.RESTORERS) == {'ddim', 'ddnm', 'repaint'}
  assert set(validate.MASKS) == set(degrade.MASKS) | set(degrade.GIVEN)
  assert set(validate.COMPARATORS) == set(compare.COMPARATORS) | set(compare.ENCODER_COMPARATORS)
  assert set(validate.ATTACKS) == set(attacks.ATTACKS)
  assert set(attacks.ATTACKS) == {'drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse'}


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


def test_test_modules_have_unique_names():
  """pytest imports test files by basename (no packages under tests/): two files of one name in
  different folders stop the whole run at collection."""
  names = {}
  for root, _, files in os.walk(os.path.join(REPO, 'tests')):
    for f in files:
      if f.startswith('test_') and f.endswith('.py'):
        names.setdefault(f, []).append(os.path.relpath(os.path.join(root, f), REPO))
  assert not {f: p for f, p in names.items() if len(p) > 1}
