"""Avro (.avro): fastavro decodes records (it has no columnar reader); each
run of BATCH_ROWS records becomes one Arrow batch with the file's types.

A union field (["double", "string"], say) may hold values of several
types: the values of the column's common type stay in the column, and a
record holding another type is UNDECODED, its values written as JSON in
RAW for the parser to decode alone (a type_error when the value is not of
the declared type), so one odd value never costs its neighbours.
"""

import collections
import json
import numbers
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from schemas.dataset import Dataset
from transforms.formats.base import Format, open_binary
from transforms.formats.raw import BATCH_ROWS, raw_batch


def _type_group(value):
  """Values that share one Arrow column: numbers (not booleans) together."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return numbers.Real
  return type(value)


def _json_value(value):
  """A value json cannot write: datetimes in RFC 3339, the rest as text."""
  return value.isoformat() if hasattr(value, 'isoformat') else str(value)


def _mixed_column(values: list) -> Tuple[pa.Array, np.ndarray]:
  """(the column of the most common type group, null elsewhere; the rows
  holding a value of another group). The first group wins a tie."""
  groups = [None if v is None else _type_group(v) for v in values]
  counts = collections.Counter(g for g in groups if g is not None)
  common = counts.most_common(1)[0][0]
  odd = np.array([g is not None and g is not common for g in groups], bool)
  return pa.array([None if o else v for v, o in zip(values, odd)]), odd


def _table(records: List[dict]) -> Tuple[pa.Table, Optional[np.ndarray]]:
  """Records -> (table, rows left UNDECODED or None). One pass over the
  records when every column holds one type; column by column otherwise."""
  try:
    return pa.Table.from_pylist(records), None
  except (pa.ArrowInvalid, pa.ArrowTypeError):
    pass
  names = list(dict.fromkeys(k for r in records[:1] for k in r))
  odd = np.zeros(len(records), bool)
  columns = []
  for name in names:
    values = [r.get(name) for r in records]
    try:
      columns.append(pa.array(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
      column, rows = _mixed_column(values)
      columns.append(column)
      odd |= rows
  return pa.Table.from_arrays(columns, names=names), odd


def _batch(records: List[dict], path: str, position: int) -> pa.RecordBatch:
  table, odd = _table(records)
  if odd is None or not odd.any():
    return raw_batch(table, path, position)
  raw = [json.dumps(r, sort_keys=True, default=_json_value) if o else None
         for r, o in zip(records, odd)]
  return raw_batch(table, path, position, raw=raw, undecoded=odd)


class Avro(Format):
  """Avro object container files, read whole."""

  name = 'avro'
  extensions = ('.avro',)

  def batches(self, path: str, start: int, end: Optional[int],
              dataset: Dataset) -> Iterator[pa.RecordBatch]:
    import fastavro  # pylint: disable=g-import-not-at-top
    del start, end, dataset
    with open_binary(path) as f:
      position, pending = 0, []
      try:
        for record in fastavro.reader(f):
          pending.append(record)
          if len(pending) == BATCH_ROWS:
            yield _batch(pending, path, position)
            position += len(pending)
            pending = []
      except Exception:
        # A break: the records before it stand.
        if pending:
          yield _batch(pending, path, position)
        raise
      if pending:
        yield _batch(pending, path, position)
