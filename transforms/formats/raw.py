"""Raw batches: what every format's reader gives, one row per record.

A raw batch holds the declared fields as the file gave them, plus the meta
columns: SOURCE and POSITION (the file and the record's 0-based number in
it), RAW (the record's text, null where the format keeps none), ERROR and
ERROR_KIND (why the record could not be decoded at all) and UNDECODED (the
fast decoder could not hold the record's values in the declared types: the
parser decodes that record alone from RAW, as JSON).
"""

import json
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa

from transforms.common import json_row

# Columns of a raw batch besides the record's own fields.
SOURCE, POSITION, RAW, ERROR, ERROR_KIND, UNDECODED = (
    '__source', '__position', '__raw', '__error', '__error_kind',
    '__undecoded')
META_COLUMNS = (SOURCE, POSITION, RAW, ERROR, ERROR_KIND, UNDECODED)

# Rows per raw batch.
BATCH_ROWS = 16384


class RawRecord(NamedTuple):
  """One record as read, for the per-record (streaming and fallback) path."""
  source: str               # file the record came from
  position: int             # 0-based record number in that file
  text: Optional[str]       # the raw record as text, for the dead-letter row
  values: Optional[dict]    # decoded field -> value; None when error is set
  error: Optional[str] = None
  error_kind: Optional[str] = None   # None: 'malformed'


def _meta_arrays(source: str, positions: np.ndarray, raw: Optional[List],
                 errors: Optional[List], kinds: Optional[List],
                 undecoded: Optional[np.ndarray]) -> List[pa.Array]:
  n = len(positions)
  return [
      pa.DictionaryArray.from_arrays(
          pa.array(np.zeros(n, np.int32)), pa.array([source])).cast(
              pa.string()),
      pa.array(positions, pa.int64()),
      (raw if isinstance(raw, pa.Array) else pa.array(raw, pa.string()))
      if raw is not None else pa.nulls(n, pa.string()),
      pa.array(errors, pa.string()) if errors is not None else pa.nulls(
          n, pa.string()),
      pa.array(kinds, pa.string()) if kinds is not None else pa.nulls(
          n, pa.string()),
      pa.array(undecoded, pa.bool_()) if undecoded is not None else
      pa.array(np.zeros(n, bool)),
  ]


def raw_batch(values: pa.Table, source: str, first_position: int,
              raw: Optional[List[str]] = None,
              errors: Optional[List[Optional[str]]] = None,
              kinds: Optional[List[Optional[str]]] = None,
              undecoded: Optional[np.ndarray] = None) -> pa.RecordBatch:
  """Decoded values + the meta columns -> one raw batch (as many rows as
  `raw` has, when given: a CSV may declare none of the columns)."""
  n = len(raw) if raw is not None else values.num_rows
  positions = np.arange(first_position, first_position + n, dtype=np.int64)
  values = values.combine_chunks()
  arrays = [values.column(i).combine_chunks() if values.column(i).num_chunks
            else pa.array([], values.schema.field(i).type)
            for i in range(values.num_columns)]
  arrays += _meta_arrays(source, positions, raw, errors, kinds, undecoded)
  names = values.column_names + list(META_COLUMNS)
  return pa.RecordBatch.from_arrays(arrays, names=names)


def unreadable_batch(source: str, position: int, error: Exception
                     ) -> pa.RecordBatch:
  """One row saying the rest of `source` from `position` could not be read."""
  message = (f'{source}: unreadable from record {position} on: '
             f'{type(error).__name__}: {error}')
  arrays = _meta_arrays(source, np.array([position], np.int64), None,
                        [message], ['unreadable_file'], None)
  return pa.RecordBatch.from_arrays(arrays, names=list(META_COLUMNS))


def raw_records(batch: pa.RecordBatch, rows: Optional[Sequence[int]] = None
                ) -> Iterator[RawRecord]:
  """RawRecords of a raw batch's `rows` (default: all): the per-record path.

  Values come from the text for rows the fast decoder left UNDECODED, else
  from the decoded columns.
  """
  names = [n for n in batch.schema.names if n not in META_COLUMNS]
  if rows is None:
    rows = range(batch.num_rows)
  rows = list(rows)
  taken = batch.take(pa.array(rows, pa.int64())) if rows else batch.slice(0, 0)
  for row in taken.to_pylist():
    text, error = row[RAW], row[ERROR]
    values = None
    if error is None:
      if row[UNDECODED]:
        values = json.loads(text)
      else:
        values = {n: row[n] for n in names}
    if text is None and values is not None:
      text = json_row(values)
    yield RawRecord(row[SOURCE], row[POSITION], text, values, error,
                    row[ERROR_KIND])
