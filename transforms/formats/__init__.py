"""The input formats: one module per format, each a `Format`
(transforms.formats.base) saying what it can do, and this registry, from
which every list of formats in the project comes.

A new format is one new module here and one line in `_ALL`; nothing else
branches on a format's name.
"""

import os
from typing import Dict, Optional, Tuple

from transforms.formats.avro_format import Avro
from transforms.formats.base import Format, InputError
from transforms.formats.csv_format import Csv
from transforms.formats.jsonl_format import JsonLines
from transforms.formats.parquet_format import Parquet

_ALL = (JsonLines(), Csv(), Avro(), Parquet())

# name -> Format, in the order flags and messages list them.
REGISTRY: Dict[str, Format] = {f.name: f for f in _ALL}
# The format names (for flags' choices and messages).
FORMATS: Tuple[str, ...] = tuple(REGISTRY)

__all__ = ['FORMATS', 'REGISTRY', 'Format', 'InputError', 'format_named',
           'format_of', 'compressible_formats', 'text_formats']


def format_named(name: str) -> Format:
  """The registered format called `name`."""
  if name not in REGISTRY:
    raise InputError(f'unknown --input_format {name!r}; '
                     f'use one of {", ".join(REGISTRY)}')
  return REGISTRY[name]


def format_of(path: str, explicit: Optional[str] = None) -> str:
  """The format name of `path`: the explicit one, else from the extension
  (a .gz after it is the compression)."""
  if explicit:
    return format_named(explicit).name
  base = path[:-3] if path.endswith('.gz') else path
  ext = os.path.splitext(base)[1].lower()
  for fmt in REGISTRY.values():
    if ext in fmt.extensions:
      return fmt.name
  names = '/'.join(f.extensions[0] for f in REGISTRY.values())
  raise InputError(
      f'cannot tell the format of {path}: use a {names} '
      f'name (optionally .gz) or pass --input_format')


def compressible_formats() -> Tuple[str, ...]:
  """Formats whose whole file may be a .gz stream."""
  return tuple(n for n, f in REGISTRY.items() if f.compressible)


def text_formats() -> Tuple[str, ...]:
  """Formats that keep each record's text as written."""
  return tuple(n for n, f in REGISTRY.items() if f.keeps_text)
