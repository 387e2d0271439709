"""Flat Arrow columns <-> TFXIO RecordBatches, typed by the dataset declaration.

The pipeline's RecordBatches have flat columns (`Dataset.batch_schema`: one
value or null per row). TFDV and tf.Transform consume RecordBatches in the
TFXIO convention: every column is a list array (one list of values per row;
a null list for a missing value, which TFDV counts as missing and checks
against presence). Strings are UTF-8 bytes in TFXIO batches, as tf.Example
features are. Both directions are column-wise: offsets and value arrays, no
Python rows.
"""

from typing import Dict, Optional, Union

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.common import slices

_TFXIO_TYPES = {'string': pa.large_binary(), 'float': pa.float32(),
                'int': pa.int64(), 'timestamp': pa.int64()}


def tfxio_arrow_schema(types: Dict[str, str]) -> pa.Schema:
  return pa.schema([pa.field(n, pa.large_list(_TFXIO_TYPES[t]))
                    for n, t in types.items()])


def flat_column(column: Union[pa.Array, pa.ChunkedArray]) -> pa.Array:
  """One Array (chunks combined); timestamps as int64 epoch microseconds,
  the form the pipeline computes with."""
  if isinstance(column, pa.ChunkedArray):
    column = (column.combine_chunks() if column.num_chunks
              else pa.array([], type=column.type))
  if pa.types.is_timestamp(column.type):
    if column.type.unit != 'us':
      column = column.cast(pa.timestamp('us', tz=column.type.tz))
    column = column.cast(pa.int64())
  return column


def _list_column(column: pa.Array, ftype: str) -> pa.LargeListArray:
  """Flat column (one value or null per row) -> large_list column of one
  value per row, a null list where the value is null."""
  values = column.cast(_TFXIO_TYPES[ftype])
  n = len(values)
  if values.null_count == 0:
    offsets = np.arange(n + 1, dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)
  present = values.is_valid().to_numpy(zero_copy_only=False)
  offsets = np.zeros(n + 1, dtype=np.int64)
  np.cumsum(present, out=offsets[1:])
  return pa.LargeListArray.from_arrays(
      pa.array(offsets), values.drop_null(), mask=pa.array(~present))


def to_tfxio_batch(batch: Union[pa.RecordBatch, pa.Table],
                   types: Dict[str, str]) -> pa.RecordBatch:
  """Flat columns -> RecordBatch with one large_list column per name of
  `types`, in its order (strings as UTF-8 bytes, floats as float32, ints
  and timestamps as int64, a null value as a null list). Columns outside
  `types` are dropped; a name the batch lacks is all null lists."""
  names = set(batch.schema.names)
  arrays = []
  for name, ftype in types.items():
    if name in names:
      column = flat_column(batch.column(name))
    else:
      column = pa.nulls(batch.num_rows, type=_TFXIO_TYPES[ftype])
    arrays.append(_list_column(column, ftype))
  return pa.RecordBatch.from_arrays(arrays, schema=tfxio_arrow_schema(types))




class ToTFXIOBatches(beam.PTransform):
  """PCollection[pa.RecordBatch | pa.Table] of flat columns ->
  PCollection[pa.RecordBatch] in the TFXIO convention (see
  `to_tfxio_batch`), each of at most `max_rows` rows; empty inputs are
  dropped."""

  def __init__(self, types: Dict[str, str], max_rows: Optional[int] = 10000):
    super().__init__()
    self._types = dict(types)
    self._max_rows = max_rows

  def expand(self, batches):
    types, max_rows = self._types, self._max_rows
    if max_rows:
      batches = batches | 'SliceBatches' >> beam.FlatMap(slices, max_rows)
    else:
      batches = batches | 'SkipEmpty' >> beam.Filter(lambda b: b.num_rows)
    return batches | 'ToTFXIOBatch' >> beam.Map(to_tfxio_batch, types)


def first_values(column: Union[pa.Array, pa.ChunkedArray]) -> pa.Array:
  """List column -> flat column of each list's first value (null where the
  list is null or empty), e.g. tf.Transform's one-value output columns."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  if not (pa.types.is_list(column.type) or
          pa.types.is_large_list(column.type)):
    return column
  lengths = pc.fill_null(pc.list_value_length(column), 0)
  if len(column) and pc.all(pc.equal(lengths, 1)).as_py():
    return column.flatten()  # exactly one value per row: no copy
  present = lengths.to_numpy(zero_copy_only=False) > 0
  # offsets index `values` (the whole child array, also for a slice).
  starts = column.offsets.to_numpy()[:-1].astype(np.int64)
  return column.values.take(pa.array(starts, mask=~present))
