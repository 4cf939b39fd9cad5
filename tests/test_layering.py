"""Imports run one way: core <- training <- experiments <- cli (DESIGN.md section 6.4).

Every module of gqa_jax is parsed with `ast` (nothing is imported, so this is cheap) and
its imports of the package's own modules are collected, at module level and inside
functions. Checked:
  (a) no cycle among module-level imports;
  (b) nothing outside the cli layer imports it, at any level;
  (c) neither the core nor the training layer imports the experiment layer, at any level;
  (d) the core imports nothing of the training layer, at any level;
  (e) the cli package's command modules do not import the package back, nor use importlib.
An `if __name__ == '__main__':` block is exempt: `python -m gqa_jax.train` runs the cli.
"""

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = 'gqa_jax'
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Layers by module name; a name ending in '.' covers a package and everything in it.
CORE = ('gqa_jax', 'gqa_jax.layers', 'gqa_jax.network', 'gqa_jax.models', 'gqa_jax.decoding',
        'gqa_jax.optimizers', 'gqa_jax.partitioning', 'gqa_jax.checkpoints',
        'gqa_jax.checkpoints.', 'gqa_jax.convert', 'gqa_jax.lowrank', 'gqa_jax.calibration',
        'gqa_jax.data',
        'gqa_jax.data.',
        'gqa_jax.gin_utils', 'gqa_jax.info', 'gqa_jax.errors', 'gqa_jax.locks', 'gqa_jax.native_stderr',
        'gqa_jax.outputs')
TRAINING = ('gqa_jax.train', 'gqa_jax.train_utils', 'gqa_jax.evaluation', 'gqa_jax.microbatches',
            'gqa_jax.preflight')
EXPERIMENTS = ('gqa_jax.experiments', 'gqa_jax.experiments.')
CLI = ('gqa_jax.cli', 'gqa_jax.cli.')
LAYERS = {'core': CORE, 'training': TRAINING, 'experiments': EXPERIMENTS, 'cli': CLI}


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob('*.py'))}


def layer_of(module: str) -> str:
  for layer, names in LAYERS.items():
    if any(module == n or (n.endswith('.') and module.startswith(n)) for n in names):
      return layer
  return 'cli' if module.startswith('gqa_jax.cli') else ''  # also gqa_jax/cli_*.py


def _resolve(name: str) -> str:
  """`name` (a module, or an attribute of one) as the longest module of the package."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name


def _is_main_block(node: ast.AST) -> bool:
  test = getattr(node, 'test', None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
          and isinstance(test.left, ast.Name) and test.left.id == '__name__'
          and any(isinstance(c, ast.Constant) and c.value == '__main__'
                  for c in test.comparators))


def _imports(module: str, path: Path) -> List[Tuple[str, bool, int]]:
  """(imported module, at module level?, line) for each import of the package's modules."""
  found = []
  is_package = path.name == '__init__.py'

  def targets(node) -> List[str]:
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ''
    if node.level:  # relative: from the module's package, `level` steps up
      package = module.split('.') if is_package else module.split('.')[:-1]
      package = package[:len(package) - node.level + 1]
      base = '.'.join(package + ([base] if base else []))
    # `from pkg import name`: name is a submodule, or else an attribute of pkg.
    return [f'{base}.{a.name}' for a in node.names]

  def visit(node, top_level: bool):
    for child in ast.iter_child_nodes(node):
      if _is_main_block(child):
        continue
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for name in targets(child):
          if name == PACKAGE or name.startswith(PACKAGE + '.'):
            target = _resolve(name)
            if target and target != module:
              found.append((target, top_level, child.lineno))
      nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      visit(child, top_level and not nested)

  visit(ast.parse(path.read_text(), str(path)), True)
  return found


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """One cycle through each strongly connected component that has one (Tarjan)."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def strongconnect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(_path_through(graph, set(component), min(component)))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  return cycles


def _path_through(graph, component: Set[str], start: str) -> List[str]:
  """A cycle from `start` back to it inside `component` (breadth-first)."""
  previous, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:  # back at the start: the path to v, then the edge v -> start
          path = [v]
          while previous[path[-1]] is not None:
            path.append(previous[path[-1]])
          return path[::-1] + [start]
        if w not in previous:
          previous[w] = v
          nxt.append(w)
    frontier = nxt
  return sorted(component)


def _violations(importer_layers, imported_layer, module_level_only=False) -> List[str]:
  bad = []
  for module, imports in sorted(IMPORTS.items()):
    if layer_of(module) not in importer_layers:
      continue
    for target, top_level, line in imports:
      if layer_of(target) == imported_layer and (top_level or not module_level_only):
        where = 'module level' if top_level else 'inside a function'
        bad.append(f'{MODULES[module].relative_to(ROOT.parent)}:{line}: {module} '
                   f'({layer_of(module)}) imports {target} ({imported_layer}), {where}')
  return bad


def test_every_module_has_a_layer():
  unplaced = [m for m in MODULES if not layer_of(m)]
  assert not unplaced, (f'{unplaced}: add each to a layer (CORE, TRAINING, EXPERIMENTS, '
                        'CLI) in tests/test_layering.py')


def test_no_import_cycle():
  graph = {m: {t for t, top_level, _ in imports if top_level}
           for m, imports in IMPORTS.items()}
  cycles = _cycles(graph)
  assert not cycles, 'module-level import cycles: ' + '; '.join(
      ' -> '.join(c) for c in cycles)


def test_nothing_outside_the_cli_imports_it():
  bad = _violations({'core', 'training', 'experiments'}, 'cli')
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('importer', ['core', 'training'])
def test_core_and_training_never_import_the_experiment_layer(importer):
  bad = _violations({importer}, 'experiments')
  assert not bad, '\n'.join(bad)


def test_core_never_imports_training():
  bad = _violations({'core'}, 'training')
  assert not bad, '\n'.join(bad)


def test_cli_commands_do_not_import_the_cli_package_back():
  """The package imports its command modules directly (no importlib); a command module
  that imported the package back would close a circle through its __init__."""
  bad = [f'{m} imports gqa_jax.cli (line {line})'
         for m, imports in sorted(IMPORTS.items())
         if m.startswith('gqa_jax.cli.') and m != 'gqa_jax.cli.__main__'
         for target, _, line in imports if target == 'gqa_jax.cli']
  bad += [f'{m} uses importlib' for m, path in sorted(MODULES.items())
          if layer_of(m) == 'cli' and 'importlib' in path.read_text()]
  assert not bad, '\n'.join(bad)


def _reason_given(lines: List[str], line: int) -> bool:
  """A comment on the import's line, or just above it or above the block of imports
  that it belongs to."""
  if '#' in lines[line - 1]:
    return True
  above = line - 2
  while above >= 0 and lines[above].strip().startswith(('from ', 'import ')):
    if '#' in lines[above]:
      return True
    above -= 1
  return above >= 0 and lines[above].strip().startswith('#')


def test_every_function_local_import_says_why():
  """An import of the package's own modules inside a function hides a dependency; it is
  allowed only with a comment giving the reason (a heavy optional dependency such as
  TensorFlow, torch, matplotlib or safetensors; start-up time of the CLI)."""
  bad = []
  for module, imports in sorted(IMPORTS.items()):
    lines = MODULES[module].read_text().splitlines()
    bad += [f'{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target} inside '
            'a function without a comment saying why'
            for target, top_level, line in imports
            if not top_level and not _reason_given(lines, line)]
  assert not bad, '\n'.join(bad)


def test_the_checker_sees_what_it_checks():
  """The parser itself: known edges are found, with their level."""
  cli_imports = {t: top for t, top, _ in IMPORTS['gqa_jax.cli']}
  assert cli_imports.get('gqa_jax.cli.flags') is True
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []
  assert layer_of('gqa_jax.checkpoints.t5x') == 'core'
  assert layer_of('gqa_jax.cli.bench') == 'cli'
  assert layer_of('gqa_jax.experiments.bench') == 'experiments'
  assert _reason_given(['x = 1', '  # TensorFlow', '  from gqa_jax import data'], 3)
  assert not _reason_given(['x = 1  # unrelated', '  y = 2', '  from gqa_jax import data'], 3)


def test_the_readme_module_table_names_every_module():
  """Every module and package of gqa_jax is named in the README's "What is here" table,
  and every `gqa_jax/...` path the table names exists: the table matches the tree."""
  readme = (ROOT.parent / 'README.md').read_text()
  table = readme[readme.index('## What is here'):]
  table = '\n'.join(line for line in table.splitlines()[1:] if line.startswith('|'))
  top = {p.name for p in ROOT.iterdir()
         if (p.suffix == '.py' and p.name != '__init__.py') or (p / '__init__.py').exists()}
  missing = sorted(n for n in top if not (f'`{n}`' in table or f'/{n}`' in table
                                          or f'`{n}/`' in table or f'/{n}/`' in table))
  assert not missing, f'README module table lacks {missing}'
  named = set(re.findall(r'`(gqa_jax/[\w/]*\w(?:\.py)?/?)`', table))
  absent = sorted(p for p in named if not (ROOT.parent / p).exists())
  assert not absent, f'README module table names {absent}, which do not exist'
  for package in ('experiments', 'cli'):
    row = next(line for line in table.splitlines() if f'`gqa_jax/{package}/`' in line)
    files = sorted(p.name for p in (ROOT / package).glob('*.py') if p.name != '__init__.py')
    unnamed = [f for f in files if f'`{f}`' not in row]
    assert not unnamed, f'README row of gqa_jax/{package}/ lacks {unnamed}'
