"""Writing outputs: Parquet and JSON lines from RecordBatches (batch), JSON
lines cut by processing time and Pub/Sub messages from rows (streaming).
"""

import json
import struct
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger, window
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import beam_s3


beam_s3.install()   # Beam's S3 file system, fixed (see the module)


def conform(batch, schema: pa.Schema) -> pa.Table:
  """A RecordBatch or Table -> Table of `schema`'s columns and types.

  int64 epoch microseconds become the schema's timestamp type; columns
  outside the schema are dropped; a column the schema names but the batch
  lacks is all null.
  """
  table = (batch if isinstance(batch, pa.Table)
           else pa.Table.from_batches([batch]))
  columns = []
  for field in schema:
    if field.name in table.column_names:
      column = table.column(field.name)
      if column.type != field.type:
        column = column.cast(field.type)
    else:
      column = pa.nulls(table.num_rows, type=field.type)
    columns.append(column)
  return pa.Table.from_arrays(columns, schema=schema)


class WriteParquet(beam.PTransform):
  """PCollection[pa.RecordBatch | pa.Table] -> Parquet files
  `<prefix>-SSSSS-of-NNNNN.parquet` of `schema`."""

  def __init__(self, prefix: str, schema: pa.Schema):
    super().__init__()
    self._prefix, self._schema = prefix, schema

  def expand(self, batches):
    schema = self._schema
    return (batches
            | 'ConformToSchema' >> beam.Map(conform, schema)
            | 'WriteParquet' >> beam.io.WriteToParquetBatched(
                self._prefix, schema, file_name_suffix='.parquet'))


# A string JSON can hold between quotes as it is (json.dumps escapes
# quotes, backslashes, control characters and, by default, non-ASCII).
_PLAIN = r'^[\x20-\x21\x23-\x5b\x5d-\x7e]*$'
# Rows from which a string column is dictionary-encoded first.
_DICTIONARY_FROM = 64


def _json_values(column: pa.Array) -> pa.Array:
  """One column -> the JSON text of each value, as json.dumps writes it
  (floats may be spelled differently, e.g. 1e-05 as 0.00001, but read back
  as the same number). Values the column form cannot write (strings that
  need escapes, NaN, nested types) are written by json.dumps."""
  t = column.type
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    column = column.cast(pa.string())
    if len(column) >= _DICTIONARY_FROM:
      # A column of few values (a channel, a country) is written once per
      # value, then taken per row.
      encoded = pc.dictionary_encode(column)
      if len(encoded.dictionary) * 2 <= len(column):
        return pc.fill_null(
            _json_values(encoded.dictionary).take(encoded.indices), 'null')
    plain = pc.fill_null(pc.match_substring_regex(column, _PLAIN), True)
    text = pc.binary_join_element_wise('"', column, '"', '')
  elif pa.types.is_integer(t):
    plain = pa.repeat(pa.scalar(True), len(column))
    text = column.cast(pa.string())
  elif pa.types.is_floating(t):
    column = column.cast(pa.float64())
    plain = pc.fill_null(pc.is_finite(column), True)
    text = column.cast(pa.string())
    # Arrow writes 1.0 as "1": keep it a float for the reader. A whole
    # value (equal to its floor) written without an exponent (Arrow writes
    # 1e10 as "1e+10") gets ".0"; a plain substring search, not a regex.
    whole = pc.and_(pc.equal(pc.floor(column), column),
                    pc.invert(pc.match_substring(text, 'e')))
    if pc.any(whole).as_py():
      text = pc.if_else(whole, pc.binary_join_element_wise(text, '.0', ''),
                        text)
  elif pa.types.is_boolean(t):
    plain = pa.repeat(pa.scalar(True), len(column))
    text = pc.if_else(column, 'true', 'false')
  else:
    plain = pa.repeat(pa.scalar(False), len(column))
    text = pa.repeat(pa.scalar('', pa.string()), len(column))
  text = pc.fill_null(text, 'null')
  rest = np.flatnonzero(~np.asarray(
      plain.to_numpy(zero_copy_only=False), dtype=bool))
  if len(rest):
    values = column.take(pa.array(rest)).to_pylist()
    dumped = [json.dumps(v, default=str) for v in values]
    text = text.to_pylist()
    for i, line in zip(rest, dumped):
      text[i] = line
    text = pa.array(text, pa.string())
  return text


def json_lines(batch) -> str:
  """A RecordBatch -> its rows as JSON lines text (keys sorted, as
  json.dumps(row, sort_keys=True) writes them), built column by column."""
  names = sorted(batch.schema.names)
  if not names or not batch.num_rows:
    return '\n'.join('{}' for _ in range(batch.num_rows))
  parts = []
  for i, name in enumerate(names):
    parts.append(('{' if i == 0 else ', ') + json.dumps(name) + ': ')
    parts.append(_json_values(batch.column(name)))
  parts.append('}')
  lines = pc.binary_join_element_wise(*parts, '')
  joined = pc.binary_join(pa.ListArray.from_arrays(
      pa.array([0, len(lines)], pa.int32()), lines), '\n')
  return joined[0].as_py()


class WriteJsonLines(beam.PTransform):
  """PCollection[pa.RecordBatch] -> JSON lines files
  `<prefix>-SSSSS-of-NNNNN.jsonl`, one object per row, keys sorted.

  Each batch is turned into text column by column (`json_lines`) and
  written as one block.
  """

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def expand(self, batches):
    return (batches
            | 'SkipEmpty' >> beam.Filter(lambda b: b.num_rows > 0)
            | 'ToJsonBlock' >> beam.Map(json_lines)
            | 'WriteLines' >> beam.io.WriteToText(
                self._prefix, file_name_suffix='.jsonl'))


# Streaming --------------------------------------------------------------------
class _WritePaneFile(beam.DoFn):

  def __init__(self, directory: str, prefix: str, shards: int):
    self._directory, self._prefix, self._shards = directory, prefix, shards

  def process(self, element, pane=beam.DoFn.PaneInfoParam):
    shard, blocks = element
    name = (f'{self._prefix}-{pane.index:06d}.jsonl' if self._shards == 1
            else f'{self._prefix}-{pane.index:06d}-{shard:03d}.jsonl')
    path = FileSystems.join(self._directory, name)
    with FileSystems.create(path) as f:
      # Sorted: the same rows give the same file, whatever the order.
      for block in sorted(_unpack(b) for b in blocks):
        f.write(block + b'\n')
    yield path


def _shard_and_block(batch, shards: int):
  """A RecordBatch -> [(shard, its JSON lines compressed)], or [] when
  empty. The shard is a hash of the text (crc32, the same in every
  process), so the same rows go to the same file's shard on every run."""
  if not batch.num_rows:
    return []
  text = json_lines(batch).encode('utf-8')
  return [(zlib.crc32(text) % shards, _pack(text))]


def _pack(text: bytes) -> bytes:
  """JSON text -> its length (8 bytes) and zstd level 1: 10 times faster
  than zlib level 1 on JSON lines, and smaller (bench/RESULTS.md)."""
  return struct.pack('<Q', len(text)) + pa.compress(
      text, codec='zstd', asbytes=True)


def _unpack(block: bytes) -> bytes:
  (size,) = struct.unpack_from('<Q', block)
  return pa.decompress(block[8:], decompressed_size=size, codec='zstd',
                       asbytes=True)


class WriteJsonLinesPanes(beam.PTransform):
  """PCollection[pa.RecordBatch] -> files
  `<directory>/<prefix>-<pane:06d>.jsonl` (`...-<pane:06d>-<shard:03d>.jsonl`
  with several shards), one object per row (keys sorted, `json_lines`);
  returns PCollection[str] of the paths written.

  Batches are cut into files by processing time (every `every` seconds
  while batches arrive) in the global window, and flushed when the stream
  ends. A sink windowed by event time would drop rows behind the
  watermark (late events, late aggregate panes); this one drops nothing.
  A pane's text waits in the runner's state until it fires, compressed
  (JSON text shrinks 5-10 times) and spread over `shards` keys, so that
  neither one worker nor one state entry holds a whole pane: one key held
  every row of a minute, and at 100,000 events Flink's TaskManager ran out
  of heap copying it (bench/RESULTS.md). A restarted job starts again at
  pane 0: give it a fresh directory.
  """

  def __init__(self, directory: str, prefix: str, every: int = 60,
               shards: int = 1):
    super().__init__()
    self._directory, self._prefix, self._every = directory, prefix, every
    self._shards = shards

  def expand(self, batches):
    return (batches
            | 'ToJsonBlock' >> beam.FlatMap(_shard_and_block, self._shards)
            | 'CutByProcessingTime' >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.AfterWatermark(
                    early=trigger.AfterProcessingTime(self._every)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | 'OneFilePerPane' >> beam.GroupByKey()
            | 'WriteFile' >> beam.ParDo(
                _WritePaneFile(self._directory, self._prefix, self._shards)))


def batch_rows(batch: pa.RecordBatch):
  """A RecordBatch -> its rows as dicts: for sinks that take one message
  per row (Pub/Sub, Kafka)."""
  return batch.to_pylist()


class WriteJsonToPubSub(beam.PTransform):
  """PCollection[pa.RecordBatch] -> one JSON message per row on a Pub/Sub
  topic."""

  def __init__(self, topic: str):
    super().__init__()
    self._topic = topic

  def expand(self, batches):
    return (batches
            | 'ToJsonBytes' >> beam.FlatMap(
                lambda b: [line.encode('utf-8')
                           for line in json_lines(b).split('\n')]
                if b.num_rows else [])
            | 'Publish' >> beam.io.WriteToPubSub(self._topic))
