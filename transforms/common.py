"""Shared mechanics of every transform: time, counters, shards, row shapes.

Small on purpose: what more than one concept needs, in one place.

  * time: event times are int epoch microseconds inside the pipeline;
  * counters: Beam metrics in one namespace (the run summary reads them);
  * shards: a deterministic hash of a key column picks the shard of each
    row, so a shuffle moves a few (shard, RecordBatch) pairs instead of one
    element per record, and every row of one key meets in one shard;
  * dead-letter rows: one shape for every kind, batch and streaming.
"""

import datetime
import json
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.metrics import Metrics
import numpy as np
import pyarrow as pa

from transforms import arrow_pickle  # noqa: F401  (RecordBatches pickle as Arrow IPC)

NAMESPACE = 'mlpipe'
VALID = 'valid'
DEAD_LETTER = 'dead_letter'
MICROS = 1_000_000

# Shards of a keyed shuffle (dedupe by id, history by entity). A few dozen
# keeps every worker of a small cluster busy and each shard a batch of
# thousands of rows at a million records; --shards raises it for more.
DEFAULT_SHARDS = 32

# Rows of one element a grouped step emits (dedupe, history, aggregates,
# negatives, examples). A shard or window grows with the input; an element
# must not: on Flink every element crosses the TaskManager's heap whole (the
# Fn API's data message, then the next shuffle's buffers), so one batch per
# shard needed a heap that grew with the input and the 4M run ran out of
# it. 64k rows of a transaction are a few MB; enough rows that per-element
# costs (pickling, a gRPC message) stay small beside the work.
PIECE_ROWS = 65536

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


# Time -------------------------------------------------------------------------
def to_micros(value: datetime.datetime) -> int:
  delta = value - _EPOCH
  return (delta.days * 86400 + delta.seconds) * MICROS + delta.microseconds


def micros_to_rfc3339(micros: int) -> str:
  value = _EPOCH + datetime.timedelta(microseconds=micros)
  if value.microsecond:
    return value.strftime('%Y-%m-%dT%H:%M:%S.%fZ')
  return value.strftime('%Y-%m-%dT%H:%M:%SZ')


# Counters ---------------------------------------------------------------------
class Counters:
  """Beam counters of NAMESPACE by name, created on first use (in a DoFn's
  setup or process: Metrics objects are cheap but not picklable-free)."""

  def __init__(self):
    self._counters = {}

  def inc(self, name: str, n: int = 1):
    if n:
      counter = self._counters.get(name)
      if counter is None:
        counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
      counter.inc(int(n))


class CountRows(beam.DoFn):
  """Counts the rows of RecordBatch (or Table) elements into `name` (and
  any `more` names), and passes each element on unchanged."""

  def __init__(self, name: str, *more: str):
    self._names = (name,) + more

  def setup(self):
    self._counters = Counters()

  def process(self, batch):
    for name in self._names:
      self._counters.inc(name, batch.num_rows)
    yield batch


class CountElements(beam.DoFn):
  """Counts elements (one per record: the streaming form) into `name`."""

  def __init__(self, name: str):
    self._name = name

  def setup(self):
    self._counter = Metrics.counter(NAMESPACE, self._name)

  def process(self, element):
    self._counter.inc()
    yield element


def true_rows(mask) -> np.ndarray:
  """A boolean Arrow array -> NumPy bool array, null as False."""
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False),
                    dtype=bool)


# Shards -----------------------------------------------------------------------
# The polynomial hash's base (odd) and splitmix64's constants.
_BASE = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x) -> np.ndarray:
  """The splitmix64 finaliser of uint64 `x` (elementwise, wrapping): every
  input bit reaches the low bits."""
  x = np.asarray(x, dtype=np.uint64)
  with np.errstate(over='ignore'):
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
  return z ^ (z >> np.uint64(31))


def string_hashes(values: pa.Array) -> np.ndarray:
  """uint64 hash of each string (or binary) value, from Arrow's buffers in
  NumPy: no Python object per value (turning the column into Python
  strings for pandas' hash was 9 % of the Flink workers' time). A
  polynomial over the bytes (mod 2**64) and the length, mixed by
  splitmix64; a null hashes as the empty string. The same in every
  process and run."""
  if pa.types.is_large_string(values.type) or pa.types.is_large_binary(
      values.type):
    offset_type = np.int64
  else:
    offset_type = np.int32
  n = len(values)
  if n == 0:
    return np.zeros(0, np.uint64)
  _, offsets_buf, data_buf = values.buffers()
  offsets = np.frombuffer(offsets_buf, offset_type)[
      values.offset:values.offset + n + 1].astype(np.int64)
  data = (np.frombuffer(data_buf, np.uint8) if data_buf is not None
          else np.zeros(0, np.uint8))[offsets[0]:offsets[-1]]
  starts = offsets[:-1] - offsets[0]
  lengths = np.diff(offsets)
  if values.null_count:
    lengths = np.where(values.is_valid().to_numpy(zero_copy_only=False),
                       lengths, 0)
  longest = int(lengths.max()) if n else 0
  with np.errstate(over='ignore'):
    powers = np.cumprod(np.full(longest + 1, _BASE, np.uint64),
                        dtype=np.uint64)
    position = np.arange(len(data), dtype=np.int64) - np.repeat(
        starts, np.diff(offsets))
    terms = data.astype(np.uint64) * powers[position]
    sums = np.concatenate([[np.uint64(0)],
                           np.cumsum(terms, dtype=np.uint64)])
    polynomial = sums[starts + lengths] - sums[starts]
    return splitmix64(polynomial ^ (lengths.astype(np.uint64) * _GOLDEN))


def shard_of(keys: pa.Array, num_shards: int) -> np.ndarray:
  """Shard index (int64 in [0, num_shards)) of each key; the same key gives
  the same shard in every process and run (not Python's salted hash()):
  strings by `string_hashes`, numbers by pandas' SipHash with a fixed key.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if isinstance(keys, pa.ChunkedArray):
    keys = keys.combine_chunks()
  if pa.types.is_dictionary(keys.type):
    keys = keys.dictionary_decode()
  if (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)
      or pa.types.is_binary(keys.type) or
      pa.types.is_large_binary(keys.type)):
    hashes = string_hashes(keys)
  else:
    values = keys.to_numpy(zero_copy_only=False)
    if values.dtype.kind not in 'iub':
      values = values.astype(object)
    hashes = pd.util.hash_array(values, categorize=True)
  return (hashes % np.uint64(num_shards)).astype(np.int64)


def split_by_shard(batch: pa.RecordBatch, key: str, num_shards: int
                   ) -> Iterator[Tuple[int, pa.RecordBatch]]:
  """(shard, rows of `batch` in that shard) for every non-empty shard."""
  if batch.num_rows == 0:
    return
  shards = shard_of(batch.column(key), num_shards)
  order = np.argsort(shards, kind='stable')
  sorted_shards = shards[order]
  bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
  starts = np.concatenate([[0], bounds])
  ends = np.concatenate([bounds, [len(order)]])
  for start, end in zip(starts, ends):
    # take, not slice: pyarrow 10 pickles a slice with its parent's whole
    # buffers, so every shard would carry the entire batch.
    yield int(sorted_shards[start]), batch.take(pa.array(order[start:end]))


def concat_batches(batches: List[pa.RecordBatch],
                   schema: Optional[pa.Schema] = None) -> pa.Table:
  """Batches (possibly none) -> one Table with one chunk per column."""
  batches = [b for b in batches if b.num_rows] or list(batches[:1])
  if not batches:
    if schema is None:
      raise ValueError('no batches and no schema')
    return schema.empty_table()
  table = pa.Table.from_batches(batches)
  return table.combine_chunks()


def table_to_batch(table: pa.Table) -> pa.RecordBatch:
  """A Table -> one RecordBatch (combining chunks)."""
  table = table.combine_chunks()
  batches = table.to_batches()
  if not batches:
    return pa.RecordBatch.from_arrays(
        [pa.array([], type=f.type) for f in table.schema],
        schema=table.schema)
  if len(batches) == 1:
    return batches[0]
  return pa.RecordBatch.from_arrays(
      [pa.concat_arrays([b.column(i) for b in batches])
       for i in range(table.num_columns)], schema=table.schema)


def compact(batch: pa.RecordBatch) -> pa.RecordBatch:
  """A copy of a (sliced) RecordBatch holding only its own rows' data.

  Beam encodes RecordBatch elements with pickle, and pyarrow (10) pickles
  a slice with its parent's whole buffers: a 1000-row slice of a
  million-row batch would cost as much to ship as the million rows.
  """
  return pa.RecordBatch.from_arrays(
      [pa.concat_arrays([column]) for column in batch.columns],
      schema=batch.schema)


def slices(batch: Union[pa.RecordBatch, pa.Table], max_rows: int
           ) -> Iterator[pa.RecordBatch]:
  """RecordBatches of at most `max_rows` rows: the batch itself (a table
  as one batch) if it is small enough, else compact copies of its slices;
  none for an empty batch."""
  if isinstance(batch, pa.Table):
    batch = table_to_batch(batch)
  if batch.num_rows <= max_rows:
    if batch.num_rows:
      yield batch
    return
  for start in range(0, batch.num_rows, max_rows):
    yield compact(batch.slice(start, max_rows))


def pieces(batch: Union[pa.RecordBatch, pa.Table]
           ) -> Iterator[pa.RecordBatch]:
  """`slices` of at most PIECE_ROWS rows (read when called): the form in
  which a grouped step's output leaves it."""
  return slices(batch, PIECE_ROWS)


# Dead-letter rows -------------------------------------------------------------
DEAD_LETTER_SCHEMA = pa.schema([
    ('source_file', pa.string()), ('position', pa.int64()),
    ('error_kind', pa.string()), ('field', pa.string()),
    ('message', pa.string()), ('raw', pa.string())])


def dead_letter_row(source: Optional[str], position: Optional[int],
                    kind: str, field: Optional[str], message: str,
                    raw: Optional[str]) -> Dict[str, Any]:
  """The one shape of a rejected record, whatever rejected it."""
  return {'source_file': source, 'position': position, 'error_kind': kind,
          'field': field, 'message': message, 'raw': raw}


def dead_letter_batch(rows: List[Dict[str, Any]]) -> pa.RecordBatch:
  return pa.RecordBatch.from_pylist(rows, schema=DEAD_LETTER_SCHEMA)


def json_row(row: Dict[str, Any]) -> str:
  """A row as one line of JSON (keys sorted, so files are reproducible)."""
  return json.dumps(row, sort_keys=True, default=str)
