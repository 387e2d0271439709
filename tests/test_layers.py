"""The layers of docs/ARCHITECTURE.md, checked on the code's imports.

Every import of a project module (at the top of a file or inside a
function: a lazy import is still a dependency) must point to the same
layer or a lower one, no library module imports a command, and the module
graph has no circle.
"""

import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('pipelines', 'transforms', 'schemas')

# Lowest first; a module may import its own layer and those before it.
LAYERS = (
    'pipelines.base',        # errors, quiet: imported by anything
    'schemas',               # the declaration: every name
    'transforms',            # Beam composites and the column functions
    'pipelines.outputs',     # run folders, summary, metrics
    'pipelines.cli',         # options, preflight, the command shell
    'pipelines.validation',  # TFDV: anomalies, drift, skew, the gate
    'pipelines.declaring',   # a declaration drafted from a sample of data
    'pipelines.model',       # training, registry, monitoring, retraining
    'pipelines.runs',        # the run history and retention
    'pipelines.reporting',   # the run report
    'pipelines.serving',     # the online store job and the scoring service
    'pipelines.synthetic',   # the data generators
    'pipelines',             # the commands: python -m pipelines.<command>
)


def _modules() -> Dict[str, str]:
  found = {}
  for package in PACKAGES:
    for folder, _, names in os.walk(os.path.join(ROOT, package)):
      for name in names:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          found[module.removesuffix('.__init__')] = path
  return found


MODULES = _modules()


def _imports(module: str, path: str) -> Set[str]:
  """The project modules `module` imports: `import a.b`, `from a import b`
  (b a module) and `from a.b import name` (name a member of a.b)."""
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}'
                 in MODULES else node.module for a in node.names]
    else:
      continue
    out.update(t for t in targets if t in MODULES and t != module)
  return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
  """The index in LAYERS of the longest prefix naming `module`'s layer."""
  best = -1
  for i, layer in enumerate(LAYERS):
    if module == layer or module.startswith(layer + '.'):
      if best < 0 or len(layer) > len(LAYERS[best]):
        best = i
  return best


def is_command(module: str) -> bool:
  return module.count('.') == 1 and module.startswith('pipelines.')


def test_every_module_has_a_layer():
  assert [m for m in MODULES if layer_of(m) < 0] == []


def test_the_layer_rules_are_checked_on_a_real_upward_import():
  # The rule itself, on made-up edges: a transform importing a command, and
  # the declaration importing a transform, are both upward.
  assert layer_of('transforms.parse') < layer_of('pipelines.batch')
  assert layer_of('schemas.dataset') < layer_of('transforms.read')
  assert layer_of('pipelines.model.registry') < layer_of('pipelines.registry')
  assert is_command('pipelines.batch') and not is_command('pipelines.cli.shell')


def test_no_import_goes_up_a_layer():
  upward = sorted(f'{m} -> {t}' for m, targets in GRAPH.items()
                  for t in targets if layer_of(t) > layer_of(m))
  assert upward == []


def test_no_library_module_imports_a_command():
  bad = sorted(f'{m} -> {t}' for m, targets in GRAPH.items()
               if not is_command(m) for t in targets if is_command(t))
  assert bad == []


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_circle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [
      ['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_no_module_circle():
  assert _cycles(GRAPH) == []


@pytest.mark.parametrize('name', ['io', 'history', 'generate'])
def test_no_module_name_twice_or_shadowing_the_standard_library(name):
  # io shadowed the standard library for readers; history.py and
  # generate.py stood twice. Commands keep their names (the README's
  # interface); no library module takes one of them.
  holders = [m for m in MODULES if m.rpartition('.')[2] == name]
  assert len(holders) <= 1 and all(is_command(m) for m in holders), holders
