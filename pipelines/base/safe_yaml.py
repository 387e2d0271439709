"""YAML the project reads (declarations, policies), loaded safely.

`load_yaml` is PyYAML's safe loader (plain data only, no tags that build
objects) with three refusals, each a one-line `YamlError` (exit 2):
  * a key given twice in one mapping (PyYAML keeps the later one silently);
    a merge key (`<<: *base`) may still be overridden, that is its purpose;
  * aliases that expand past `MAX_ALIAS_EXPANSION` values, or refer to
    themselves: nine anchors of nine aliases each ("billion laughs") are a
    few hundred bytes that every consumer which walks or copies the data
    expands to 9^9 values; the check counts them on the composed node graph
    without building them;
  * nesting deeper than the parser can follow.
"""

from typing import Any, Dict, List

import yaml

from pipelines.base.errors import UsageError

# Values aliases may add to a document (beyond the values written once):
# a declaration reusing a few option blocks adds tens.
MAX_ALIAS_EXPANSION = 10_000

_MERGE = 'tag:yaml.org,2002:merge'


class YamlError(UsageError, ValueError):
  """A YAML file the project reads is refused (one line, exit 2)."""


def _line(node) -> int:
  return node.start_mark.line + 1


def _expanded_size(root) -> int:
  """How many values the node graph stands for once every alias is
  written out, counted without writing them: each node's size is computed
  once. Raises YamlError for an alias inside its own anchor."""
  sizes: Dict[int, int] = {}
  open_nodes = set()
  stack: List[Any] = [(root, False)]
  while stack:
    node, children_done = stack.pop()
    key = id(node)
    if key in sizes:
      continue
    children = ([n for pair in node.value for n in pair]
                if isinstance(node, yaml.MappingNode) else
                list(node.value) if isinstance(node, yaml.SequenceNode)
                else [])
    if children_done:
      open_nodes.discard(key)
      sizes[key] = 1 + sum(sizes[id(child)] for child in children)
      continue
    if key in open_nodes:
      raise YamlError(f'line {_line(node)}: an alias refers to the value '
                      'that contains it; write the value out')
    open_nodes.add(key)
    stack.append((node, True))
    for child in children:
      if id(child) in open_nodes:
        raise YamlError(f'line {_line(child)}: an alias refers to the '
                        'value that contains it; write the value out')
      if id(child) not in sizes:
        stack.append((child, False))
  return sizes[id(root)]


def _distinct_nodes(root) -> int:
  seen, stack = set(), [root]
  while stack:
    node = stack.pop()
    if id(node) in seen:
      continue
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
      stack += [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
      stack += node.value
  return len(seen)


class _Loader(yaml.SafeLoader):
  """SafeLoader that refuses duplicate keys and alias bombs."""

  def get_single_node(self):
    node = super().get_single_node()
    if node is not None:
      added = _expanded_size(node) - _distinct_nodes(node)
      if added > MAX_ALIAS_EXPANSION:
        raise YamlError(f'aliases expand to over {MAX_ALIAS_EXPANSION} '
                        'more values; write the values out once')
    return node

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      seen = {}
      for key_node, _ in node.value:
        if key_node.tag == _MERGE:
          continue
        key = self.construct_object(key_node, deep=True)
        try:
          first = seen.setdefault(key, key_node)
        except TypeError:
          continue   # an unhashable key: SafeLoader refuses it itself
        if first is not key_node:
          raise YamlError(f'line {_line(key_node)}: key {key!r} is given '
                          f'twice (first on line {_line(first)}); give '
                          'each key once')
    return super().construct_mapping(node, deep=deep)


def load_yaml(text, where: str) -> Any:
  """The data of a YAML document (str or bytes); YamlError naming `where`
  when it is not valid YAML or hits one of the refusals above."""
  try:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
  except YamlError as e:
    raise YamlError(f'{where}: {e}') from None
  except yaml.YAMLError as e:
    raise YamlError(f'{where} is not valid YAML: '
                    f'{" ".join(str(e).split())}') from None
  except RecursionError:
    raise YamlError(f'{where} is not valid YAML: nested too deep') from None
