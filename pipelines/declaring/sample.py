"""A sample of an input's records, read through the project's own format
readers (transforms.formats), for drafting a declaration.

The readers decode declared fields; before anything is declared, each
column is read as the type the format says its values decode as (its
`column_types`): every CSV column a string (the text as written), a JSON
column the type its values share in the first block. A record holding a
value of another type is one the fast decoder leaves UNDECODED: its values
come from its own text, with their JSON types. Avro
and Parquet give their columns in the file's types. Records the reader
cannot decode at all (malformed, an unreadable rest of a file) are counted,
not sampled.
"""

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import Dataset, Field
from transforms import read
from transforms.formats import format_named, format_of

# Records read by default: enough for types, ranges and small domains,
# and a few seconds of reading at most.
SAMPLE_ROWS = 50000


@dataclasses.dataclass
class Sample:
  """Columns of the sampled records (Python values, None where a record
  has no value), in the order the input names them."""
  columns: Dict[str, List[Any]]
  rows: int                  # records sampled (decodable ones)
  complete: bool             # every record of the input was read
  undecodable: int           # malformed or unreadable records seen
  files: List[str]


def _provisional(types: Dict[str, str]) -> Dataset:
  """A declaration of every column as an optional field of `types`: what
  the readers decode before anything is known."""
  fields = {n: Field(n, t) for n, t in types.items()}
  return Dataset(name='draft', fields=fields, roles={}, rules=(),
                 histories=(), aggregates={}, transform={}, drift={},
                 path='')


def read_sample(pattern: str, input_format: Optional[str] = None,
                rows: int = SAMPLE_ROWS) -> Sample:
  """The first `rows` decodable records of the files `pattern` matches (in
  file-name order). Raises InputError (exit 2) when nothing matches."""
  paths = read.check_input(pattern, input_format)
  types: Dict[str, str] = {}
  for path in paths[:1]:
    listed = format_named(format_of(path, input_format)).column_types(path)
    types.update(listed or {})
  dataset = _provisional(types)
  columns: Dict[str, List[Any]] = {n: [] for n in types}
  taken, undecodable, complete = 0, 0, True
  for path in paths:
    if not complete:
      break
    for batch in read.read_batches(path, dataset, input_format):
      if taken >= rows:
        complete = False
        break
      if batch.num_rows > rows - taken:
        batch, complete = batch.slice(0, rows - taken), False
      failed = batch.column(read.ERROR).is_valid()
      undecodable += pc.sum(failed).as_py() or 0
      good = pc.invert(failed)
      undecoded = pc.and_(good, batch.column(read.UNDECODED))
      decoded = batch.filter(pc.and_(good, pc.invert(undecoded)))
      fields = [n for n in decoded.schema.names
                if n not in read.META_COLUMNS]
      for name in fields:
        columns.setdefault(name, [None] * taken)
      values = (pa.Table.from_batches([decoded]).select(fields).to_pydict()
                if fields else {})
      for name, column in columns.items():
        column.extend(values.get(name, [None] * decoded.num_rows))
      taken += decoded.num_rows
      # Records the fast decoder could not type: their own JSON values.
      rows_left = np.flatnonzero(undecoded.to_numpy(zero_copy_only=False))
      for record in read.raw_records(batch, rows_left.tolist()):
        for name in record.values:
          columns.setdefault(name, [None] * taken)
        for name, column in columns.items():
          column.append(record.values.get(name))
        taken += 1
  return Sample(columns=columns, rows=taken, complete=complete,
                undecodable=undecodable, files=paths)


def as_arrow(values: List[Any]) -> Optional[pa.Array]:
  """One column's values as an Arrow array, None when they mix types."""
  try:
    return pa.array(values)
  except (pa.ArrowInvalid, pa.ArrowTypeError):
    return None
