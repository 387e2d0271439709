"""Rows <-> Apache Arrow RecordBatches, typed by the dataset declaration.

TFDV and tf.Transform consume RecordBatches in the TFXIO convention: every
column is a list array (one list of values per row; a null list for a
missing value, which TFDV counts as missing and checks against presence). Parquet tables use plain columns. Strings are UTF-8 bytes in
TFXIO batches, as tf.Example features are.
"""

from typing import Dict, Iterable, List, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa

_TFXIO_TYPES = {'string': pa.large_binary(), 'float': pa.float32(),
                'int': pa.int64(), 'timestamp': pa.int64()}


def tfxio_arrow_schema(types: Dict[str, str]) -> pa.Schema:
  return pa.schema([pa.field(n, pa.large_list(_TFXIO_TYPES[t]))
                    for n, t in types.items()])


def _list_column(values: list, ftype: str) -> pa.Array:
  """One value (or None) per row -> large_list column, built from a flat
  array and offsets: nested Python lists are several times slower."""
  arrow_type = _TFXIO_TYPES[ftype]
  n = len(values)
  present = np.fromiter((v is not None for v in values), bool, n)
  if present.all():
    flat = pa.array(values, type=arrow_type)
    offsets = np.arange(n + 1, dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat)
  flat = pa.array([v for v in values if v is not None], type=arrow_type)
  offsets = np.zeros(n + 1, dtype=np.int64)
  np.cumsum(present, out=offsets[1:])
  return pa.LargeListArray.from_arrays(pa.array(offsets), flat,
                                       mask=pa.array(~present))


def to_tfxio_batch(rows: List[dict], types: Dict[str, str]) -> pa.RecordBatch:
  """List of row dicts -> RecordBatch with one large_list column per name
  (strings as UTF-8 bytes, a missing value as a null list)."""
  arrays = [_list_column([row.get(name) for row in rows], ftype)
            for name, ftype in types.items()]
  return pa.RecordBatch.from_arrays(arrays, schema=tfxio_arrow_schema(types))


class RowsToTFXIOBatches(beam.PTransform):
  """PCollection[dict] -> PCollection[pa.RecordBatch] (TFXIO list columns)."""

  def __init__(self, types: Dict[str, str], min_batch_size: int = 1000,
               max_batch_size: int = 10000):
    super().__init__()
    self._types = dict(types)
    self._min, self._max = min_batch_size, max_batch_size

  def expand(self, rows):
    types = self._types
    return (rows
            | 'BatchRows' >> beam.BatchElements(
                min_batch_size=self._min, max_batch_size=self._max)
            | 'ToRecordBatch' >> beam.Map(to_tfxio_batch, types))


def rows_from_table(table: pa.Table, names: Optional[Iterable[str]] = None
                    ) -> List[dict]:
  """A plain (Parquet) table -> list of row dicts, timestamps as epoch us."""
  if names is not None:
    table = table.select(list(names))
  columns = []
  for column in table.columns:
    if pa.types.is_timestamp(column.type):
      column = column.cast(pa.int64())
    columns.append(column)
  return pa.Table.from_arrays(columns, names=table.column_names).to_pylist()
