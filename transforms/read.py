"""Reading raw records: files into Arrow RecordBatches (batch), and the
replay source (transforms.stream_sources) as one RawRecord at a time.

Batch. `ReadRecords` turns a glob into PCollection[pa.RecordBatch] of *raw
batches*: one row per record, with

  * the declared fields as the file gave them (JSON lines decoded by
    pyarrow's JSON reader with the declared types; CSV by pyarrow's CSV
    reader, every column a string; Avro and Parquet with the file's types);
  * SOURCE and POSITION: the file and the record's 0-based number in it
    (blank lines are not records);
  * RAW: the record's text for the dead-letter output (JSON lines, CSV;
    null for Avro and Parquet, whose dead-letter text is built from the
    values only for the few records that are rejected);
  * ERROR, ERROR_KIND: why the record could not be decoded at all (not
    JSON, wrong number of CSV columns, a broken file); null otherwise;
  * UNDECODED: true where the fast decoder could not hold the record's
    values in the declared types (a number written as a string, say): the
    parser then decodes that record alone from RAW.

A block of lines that pyarrow refuses is split around the line it names
(or halved) until the bad lines stand alone and are decoded one by one, so
one bad record costs a few re-reads, not a slow batch. Uncompressed JSON
lines and CSV files are read in byte ranges, and Parquet files by row group,
so one large file still spreads over the workers of a distributed runner.

Streaming. `read_file` gives the same records one RawRecord at a time (for
the replay source in transforms.stream_sources).
"""

import base64
import contextlib
import csv
import dataclasses
import gzip
import io
import json
import os
import re
from typing import (Iterable, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple)

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.coders import PickleCoder
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.base.errors import UsageError
from schemas.dataset import Dataset
from transforms.common import MICROS, json_row, true_rows

FORMATS = ('jsonl', 'csv', 'avro', 'parquet')
_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.ndjson': 'jsonl',
               '.csv': 'csv', '.avro': 'avro', '.parquet': 'parquet'}

# Columns of a raw batch besides the record's own fields.
SOURCE, POSITION, RAW, ERROR, ERROR_KIND, UNDECODED = (
    '__source', '__position', '__raw', '__error', '__error_kind',
    '__undecoded')
META_COLUMNS = (SOURCE, POSITION, RAW, ERROR, ERROR_KIND, UNDECODED)

# Rows per raw batch, and bytes per range of a splittable file.
BATCH_ROWS = 16384
SPLIT_BYTES = 64 << 20
# A refused block of at most this many lines is decoded line by line.
_SMALL_BLOCK = 8
_ROW_IN_ERROR = re.compile(r' in row (\d+)')


class InputError(UsageError, ValueError):
  """The input cannot be read at all (no files, unknown format)."""


class RawRecord(NamedTuple):
  """One record as read, for the per-record (streaming and fallback) path."""
  source: str               # file the record came from
  position: int             # 0-based record number in that file
  text: Optional[str]       # the raw record as text, for the dead-letter row
  values: Optional[dict]    # decoded field -> value; None when error is set
  error: Optional[str] = None
  error_kind: Optional[str] = None   # None: 'malformed'


def format_of(path: str, explicit: Optional[str] = None) -> str:
  """The record format of `path`: the explicit one, else from the extension."""
  if explicit:
    if explicit not in FORMATS:
      raise InputError(f'unknown --input_format {explicit!r}; '
                       f'use one of {", ".join(FORMATS)}')
    return explicit
  base = path[:-3] if path.endswith('.gz') else path
  ext = os.path.splitext(base)[1].lower()
  if ext not in _EXTENSIONS:
    raise InputError(
        f'cannot tell the format of {path}: use a .jsonl/.csv/.avro/.parquet '
        f'name (optionally .gz) or pass --input_format')
  return _EXTENSIONS[ext]


def check_input(pattern: str, explicit_format: Optional[str] = None):
  """Preflight: the pattern matches files of a known format. Returns paths."""
  try:
    match = FileSystems.match([pattern])[0]
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f'--input {pattern} cannot be listed: {e}') from None
  paths = sorted(m.path for m in match.metadata_list)
  if not paths:
    raise InputError(f'--input matched no files: {pattern}')
  for path in paths:
    format_of(path, explicit_format)
  return paths


@contextlib.contextmanager
def _open(path: str):
  """A binary file object, gunzipped for .gz names, local or remote."""
  with FileSystems.open(
      path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw) as f:
        yield f
    else:
      yield raw


# Raw batches --------------------------------------------------------------------
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


# Lines --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Lines:
  """The record lines of a run of bytes: line i is text[i], stored at
  data[starts[i]:ends[i]] (ends[i] past its newline). Blank lines are not
  records and are left out; so are the '\r' and '\n' that end a line."""
  data: bytes
  text: pa.Array           # large_string, one per record line
  starts: np.ndarray
  ends: np.ndarray
  # Record lines that were not UTF-8 -> their bytes as read (the text has
  # U+FFFD in their place).
  not_utf8: Optional[dict] = None

  def __len__(self):
    return len(self.starts)

  def block(self, a: int, b: int) -> bytes:
    """The bytes of lines [a, b), blank lines between them included."""
    return self.data[self.starts[a]:self.ends[b - 1]]

  def line(self, i: int) -> str:
    return self.text[i].as_py()


def _lines(data: bytes) -> _Lines:
  """Splits at '\n' with NumPy and makes every line an Arrow string without
  copying. Lines that are not UTF-8 are kept as read in `not_utf8` (their
  records become dead letters), with U+FFFD in the text."""
  buffer = np.frombuffer(data, np.uint8)
  newlines = np.flatnonzero(buffer == 10)
  offsets = np.concatenate([[0], newlines + 1]).astype(np.int64)
  if not data.endswith(b'\n'):
    offsets = np.append(offsets, len(data))
  n = len(offsets) - 1
  text = pa.LargeStringArray.from_buffers(
      n, pa.py_buffer(offsets), pa.py_buffer(data))
  try:
    text.validate(full=True)
  except pa.ArrowInvalid:
    return _replaced_lines(data, offsets)
  text = pc.utf8_rtrim(text, characters='\r\n')
  record = true_rows(pc.not_equal(pc.utf8_trim_whitespace(text), ''))
  keep = np.flatnonzero(record)
  return _Lines(data, text.take(pa.array(keep)), offsets[:-1][keep],
                offsets[1:][keep])


def _replaced_lines(data: bytes, offsets: np.ndarray) -> _Lines:
  """_lines of bytes that are not all UTF-8: the lines that are not are
  found one by one and kept as read; the rest is read with U+FFFD in their
  place (a replacement never swallows a newline, so lines line up)."""
  bad = []
  for i in range(len(offsets) - 1):
    try:
      data[offsets[i]:offsets[i + 1]].decode('utf-8')
    except UnicodeDecodeError:
      bad.append(i)
  lines = _lines(data.decode('utf-8', errors='replace').encode('utf-8'))
  # Physical line -> record line: a bad line is never blank, and the
  # replaced bytes have the same newlines.
  starts = np.concatenate([[0], np.flatnonzero(
      np.frombuffer(lines.data, np.uint8) == 10) + 1])
  record_of = {int(s): i for i, s in enumerate(lines.starts)}
  replaced_starts = starts[bad]
  not_utf8 = {record_of[int(s)]: data[offsets[i]:offsets[i + 1]].rstrip(
      b'\r\n') for i, s in zip(bad, replaced_starts) if int(s) in record_of}
  return dataclasses.replace(lines, not_utf8=not_utf8)


_NOT_UTF8 = 'not valid UTF-8 (U+FFFD in raw); the bytes as read, base64: '


def _mark_not_utf8(batch: pa.RecordBatch, lines: _Lines, a: int, b: int
                   ) -> pa.RecordBatch:
  """Sets ERROR on the rows of lines [a, b) that were not UTF-8: such a
  record is malformed, and its bytes are kept in the message (base64)."""
  rows = {i - a: lines.not_utf8[i] for i in lines.not_utf8 if a <= i < b}
  if not rows:
    return batch
  errors = batch.column(ERROR).to_pylist()
  for row, raw in rows.items():
    errors[row] = _NOT_UTF8 + base64.b64encode(raw).decode('ascii')
  index = batch.schema.get_field_index(ERROR)
  arrays = list(batch.columns)
  arrays[index] = pa.array(errors, pa.string())
  return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def _count_lines(data: bytes) -> int:
  """Records in `data` (whole lines): when every line starts with a
  visible ASCII character, as JSON and CSV records do, no line is blank
  and counting newlines is enough; otherwise the lines are split."""
  buffer = np.frombuffer(data, np.uint8)
  starts = np.concatenate([[0], np.flatnonzero(buffer == 10) + 1])
  starts = starts[starts < len(buffer)]
  first = buffer[starts]
  if ((first > 32) & (first < 127)).all():
    return len(starts)
  return len(_lines(data))


def _count_records(f, upto: int) -> int:
  """Records (non-blank lines) in the first `upto` bytes of f."""
  f.seek(0)
  count, left, tail = 0, upto, b''
  while left > 0:
    chunk = f.read(min(left, SPLIT_BYTES))
    if not chunk:
      break
    left -= len(chunk)
    data = tail + chunk
    cut = data.rfind(b'\n') + 1
    count += _count_lines(data[:cut])
    tail = data[cut:]
  return count + _count_lines(tail)


def _without_bom(data: bytes) -> bytes:
  """A file's bytes without the UTF-8 byte-order mark some editors write."""
  return data[3:] if data.startswith(b'\xef\xbb\xbf') else data


def _range_lines(path: str, start: int, end: Optional[int]
                 ) -> Tuple[int, _Lines]:
  """(records before the range, the record lines starting in [start,
  end)). end None: to the end of the file."""
  before, data = _range_bytes(path, start, end)
  return before, _lines(data)


def _range_bytes(path: str, start: int, end: Optional[int]
                 ) -> Tuple[int, bytes]:
  """(records before the range, the bytes of the lines starting in
  [start, end))."""
  with _open(path) as f:
    if end is None:
      return 0, _without_bom(f.read())
    before = 0
    if start > 0:
      f.seek(start - 1)
      skip = f.read(1) != b'\n'
      data = f.read(end - start)
      if skip:
        newline = data.find(b'\n')
        if newline < 0:
          # No line starts in this range: it belongs to the one before.
          return 0, b''
        data = data[newline + 1:]
        before_bytes = start + newline + 1
      else:
        before_bytes = start
      before = _count_records(f, before_bytes)
      f.seek(end)
    else:
      data = _without_bom(f.read(end))
    if data and not data.endswith(b'\n'):
      # Finish the last line, which starts before `end`.
      rest = []
      while True:
        chunk = f.read(1 << 16)
        if not chunk:
          break
        newline = chunk.find(b'\n')
        if newline >= 0:
          rest.append(chunk[:newline + 1])
          break
        rest.append(chunk)
      data += b''.join(rest)
    return before, data


def _decode_lines(lines: _Lines, a: int, b: int, decode_block, decode_line
                  ) -> List[Tuple[str, object]]:
  """Segments covering lines [a, b) in order: ('block', Table) for runs the
  fast decoder took, ('line', decode_line(text)) for single lines.

  A refused block is split around the row pyarrow names, or halved, so a
  few bad lines cost a few re-reads of their neighbours."""
  if a >= b:
    return []
  try:
    return [('block', decode_block(lines.block(a, b), b - a))]
  except (pa.ArrowException, ValueError) as e:
    match = _ROW_IN_ERROR.search(str(e))
  if match and int(match.group(1)) < b - a:
    bad = a + int(match.group(1))
    return (_decode_lines(lines, a, bad, decode_block, decode_line) +
            [('line', decode_line(lines.line(bad)))] +
            _decode_lines(lines, bad + 1, b, decode_block, decode_line))
  if b - a <= _SMALL_BLOCK:
    return [('line', decode_line(lines.line(i))) for i in range(a, b)]
  half = (a + b) // 2
  return (_decode_lines(lines, a, half, decode_block, decode_line) +
          _decode_lines(lines, half, b, decode_block, decode_line))


def _assemble(segments, schema: pa.Schema, source: str, first: int,
              raw: pa.Array, line_values) -> pa.RecordBatch:
  """Segments of one block of lines -> one raw batch, in line order.

  `line_values(result)` turns one line's decode result into (values row or
  None, error or None, undecoded flag)."""
  raw = raw.cast(pa.string())
  if len(segments) == 1 and segments[0][0] == 'block':
    return raw_batch(segments[0][1], source, first, raw=raw)
  tables, errors, undecoded = [], [], []
  for kind, value in segments:
    if kind == 'block':
      tables.append(value)
      errors += [None] * value.num_rows
      undecoded += [False] * value.num_rows
    else:
      row, error, flag = line_values(value)
      tables.append(pa.Table.from_pylist([row or {}], schema=schema))
      errors.append(error)
      undecoded.append(flag)
  table = pa.concat_tables(tables)
  return raw_batch(table, source, first, raw=raw, errors=errors,
                   undecoded=np.array(undecoded, bool))


def _line_batches(lines: _Lines, first_line: int, schema: pa.Schema,
                  source: str, first_position: int, decode_block,
                  decode_line, line_values) -> Iterator[pa.RecordBatch]:
  """Raw batches of BATCH_ROWS lines from line `first_line` on."""
  for a in range(first_line, len(lines), BATCH_ROWS):
    b = min(a + BATCH_ROWS, len(lines))
    segments = _decode_lines(lines, a, b, decode_block, decode_line)
    batch = _assemble(segments, schema, source,
                      first_position + a - first_line,
                      lines.text.slice(a, b - a), line_values)
    yield _mark_not_utf8(batch, lines, a, b) if lines.not_utf8 else batch


# JSON lines ---------------------------------------------------------------------
def _json_schema(dataset: Dataset) -> pa.Schema:
  """What pyarrow's JSON reader decodes: the declared fields, timestamps as
  their RFC 3339 text."""
  types = {'string': pa.string(), 'float': pa.float64(), 'int': pa.int64(),
           'timestamp': pa.string()}
  return pa.schema([(n, types[f.type]) for n, f in dataset.fields.items()])


def _json_block(data: bytes, rows: int, schema: pa.Schema) -> pa.Table:
  import pyarrow.json as pj  # pylint: disable=g-import-not-at-top
  table = pj.read_json(
      io.BytesIO(data),
      read_options=pj.ReadOptions(use_threads=False,
                                  block_size=max(len(data), 1 << 20)),
      parse_options=pj.ParseOptions(explicit_schema=schema,
                                    unexpected_field_behavior='ignore'))
  if table.num_rows != rows:
    raise ValueError('a line holds more or less than one JSON object')
  return table.select(schema.names)


def _unique_keys(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f'key {repeated[0]!r} appears more than once')
  return dict(pairs)


def _json_line_problem(line: str) -> Optional[str]:
  """Why one line is not a JSON object, or None. A key given twice is a
  problem: which value was meant cannot be known."""
  try:
    values = json.loads(line, object_pairs_hook=_unique_keys)
  except ValueError as e:
    return f'not valid JSON: {e}'
  except RecursionError:
    return 'not valid JSON: nested too deeply'
  if not isinstance(values, dict):
    return 'a JSON line must be an object'
  return None


def _jsonl_batches(path: str, start: int, end: Optional[int],
                   dataset: Dataset) -> Iterator[pa.RecordBatch]:
  schema = _json_schema(dataset)
  before, lines = _range_lines(path, start, end)

  def line_values(problem):
    # A line the block decoder refused: a JSON object is decoded from its
    # text by the parser (UNDECODED); anything else is malformed.
    return None, problem, problem is None

  yield from _line_batches(
      lines, 0, schema, path, before,
      lambda data, rows: _json_block(data, rows, schema),
      _json_line_problem, line_values)


# CSV ----------------------------------------------------------------------------
def _csv_row(line: str):
  try:
    return next(csv.reader(io.StringIO(line, newline=''))), None
  except csv.Error as e:
    return None, f'not valid CSV: {e}'
  except StopIteration:
    return [], None


def _csv_records(data: bytes) -> Optional[_Lines]:
  """The records of CSV bytes when a quoted field spans lines, else None
  (then every line is a record). A record goes on over the next line while
  it holds an odd number of quotes; a blank line inside it is kept, a
  '\r' before a line end is dropped."""
  if b'"' not in data:
    return None
  text = data.decode('utf-8', errors='replace')
  physical = text.split('\n')
  if all(line.count('"') % 2 == 0 for line in physical):
    return None
  records, pending, odd = [], [], False
  for line in physical:
    line = line[:-1] if line.endswith('\r') else line
    if not pending and not line.strip():
      continue
    pending.append(line)
    odd ^= line.count('"') % 2 == 1
    if not odd:
      records.append('\n'.join(pending))
      pending = []
  if pending:
    records.append('\n'.join(pending))
  return _lines_of(records)


def _lines_of(records: List[str]) -> _Lines:
  """_Lines over given records (which may hold newlines), '\n' between."""
  encoded = [r.encode('utf-8') for r in records]
  lengths = np.array([len(e) + 1 for e in encoded], np.int64)
  ends = np.cumsum(lengths)
  starts = ends - lengths
  return _Lines(b'\n'.join(encoded) + b'\n',
                pa.array(records, pa.large_string()), starts, ends)


def _csv_block(data: bytes, rows: int, width: int) -> pa.Table:
  import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
  names = [f'c{i}' for i in range(width)]
  table = pcsv.read_csv(
      io.BytesIO(data),
      read_options=pcsv.ReadOptions(column_names=names, use_threads=False,
                                    block_size=max(len(data), 1 << 20)),
      parse_options=pcsv.ParseOptions(newlines_in_values=True),
      convert_options=pcsv.ConvertOptions(
          column_types={n: pa.string() for n in names}))
  if table.num_rows != rows:
    raise ValueError('CSV rows and lines differ')
  return table


def _csv_batches(path: str, start: int, end: Optional[int],
                 dataset: Dataset) -> Iterator[pa.RecordBatch]:
  before, data = _range_bytes(path, start, end)
  lines = _csv_records(data) or _lines(data)
  if start == 0 or end is None:
    if not len(lines):
      return
    header_line, first_line = lines.line(0), 1
  else:
    with _open(path) as f:
      header_lines = _lines(f.readline())
    header_line = header_lines.line(0) if len(header_lines) else ''
    first_line = 0
    before -= 1   # the header is not a record
  header, error = _csv_row(header_line)
  if header is None:
    yield unreadable_batch(path, 0, ValueError(
        f'unreadable CSV header: {error}'))
    return
  index = {name: i for i, name in enumerate(header)}
  declared = [n for n in dataset.fields if n in index]
  schema = pa.schema([(n, pa.string()) for n in declared])
  repeated = sorted({n for n in header if header.count(n) > 1})
  if repeated:
    # Which of the columns holds the value cannot be known: every record
    # is malformed, none silently takes one of them.
    message = f'column {repeated[0]!r} appears more than once in the header'
    for a in range(first_line, len(lines), BATCH_ROWS):
      b = min(a + BATCH_ROWS, len(lines))
      nulls = pa.Table.from_arrays(
          [pa.nulls(b - a, pa.string()) for _ in declared], schema=schema)
      yield raw_batch(nulls, path, before + a - first_line,
                      raw=lines.text.slice(a, b - a).cast(pa.string()),
                      errors=[message] * (b - a))
    return

  def decode_block(data, rows):
    table = _csv_block(data, rows, len(header))
    return pa.Table.from_arrays(
        [table.column(index[n]) for n in declared], schema=schema)

  def decode_line(line):
    row, problem = _csv_row(line)
    if row is not None and len(row) != len(header):
      problem = f'expected {len(header)} columns, found {len(row)}'
    return row, problem

  def line_values(result):
    row, problem = result
    if problem:
      return None, problem, False
    return {n: row[index[n]] for n in declared}, None, False

  yield from _line_batches(lines, first_line, schema, path, before,
                           decode_block, decode_line, line_values)


# Avro and Parquet -----------------------------------------------------------------
def _avro_batches(path: str, start: int, end: Optional[int],
                  dataset: Dataset) -> Iterator[pa.RecordBatch]:
  """fastavro decodes records (it has no columnar reader); each block of
  records becomes one Arrow batch."""
  import fastavro  # pylint: disable=g-import-not-at-top
  del start, end, dataset
  with _open(path) as f:
    position, pending = 0, []
    for record in fastavro.reader(f):
      pending.append(record)
      if len(pending) == BATCH_ROWS:
        yield raw_batch(pa.Table.from_pylist(pending), path, position)
        position += len(pending)
        pending = []
    if pending:
      yield raw_batch(pa.Table.from_pylist(pending), path, position)


def _parquet_batches(path: str, start: int, end: Optional[int],
                     dataset: Dataset) -> Iterator[pa.RecordBatch]:
  """Row groups [start, end) of a Parquet file (all when end is None)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  del dataset
  with _open(path) as f:
    parquet = pq.ParquetFile(f)
    groups = range(parquet.num_row_groups)
    if end is not None:
      groups = range(start, min(end, parquet.num_row_groups))
    position = sum(parquet.metadata.row_group(g).num_rows
                   for g in range(groups.start)) if len(groups) else 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS,
                                      row_groups=list(groups)):
      yield raw_batch(pa.Table.from_batches([batch]), path, position)
      position += batch.num_rows


_BATCH_READERS = {'jsonl': _jsonl_batches, 'csv': _csv_batches,
                  'avro': _avro_batches, 'parquet': _parquet_batches}


class FileRange(NamedTuple):
  path: str
  format: str
  start: int = 0              # byte offset, or first row group (Parquet)
  end: Optional[int] = None   # None: to the end of the file


def file_ranges(path: str, size: int, explicit_format: Optional[str] = None,
                split_bytes: int = SPLIT_BYTES) -> List[FileRange]:
  """How one file is read: in byte ranges (uncompressed JSON lines, CSV),
  by row groups (Parquet), or whole."""
  fmt = format_of(path, explicit_format)
  if path.endswith('.gz') or fmt == 'avro' or size <= split_bytes:
    return [FileRange(path, fmt)]
  if fmt == 'parquet':
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with _open(path) as f:
      metadata = pq.ParquetFile(f).metadata
    groups, ranges, start, acc = metadata.num_row_groups, [], 0, 0
    for g in range(groups):
      acc += metadata.row_group(g).total_byte_size
      if acc >= split_bytes or g == groups - 1:
        ranges.append(FileRange(path, fmt, start, g + 1))
        start, acc = g + 1, 0
    return ranges or [FileRange(path, fmt)]
  return [FileRange(path, fmt, start, min(start + split_bytes, size))
          for start in range(0, size, split_bytes)]


def read_range(file_range: FileRange, dataset: Dataset
               ) -> Iterator[pa.RecordBatch]:
  """Raw batches of one range. A file that breaks mid-way ends with one
  `unreadable_file` row naming where; the records before it stand."""
  position = 0
  try:
    for batch in _BATCH_READERS[file_range.format](
        file_range.path, file_range.start, file_range.end, dataset):
      if batch.num_rows:
        position = batch.column(POSITION)[batch.num_rows - 1].as_py() + 1
        yield batch
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a broken file raises (zlib, Avro, Parquet, OS errors), the
    # run goes on and the dead-letter output says what was lost.
    yield unreadable_batch(file_range.path, position, e)


def read_batches(path: str, dataset: Dataset,
                 explicit_format: Optional[str] = None
                 ) -> Iterator[pa.RecordBatch]:
  """Every raw batch of one whole file."""
  yield from read_range(FileRange(path, format_of(path, explicit_format)),
                        dataset)


def record_texts(path: str, dataset: Dataset, positions: Sequence[int],
                 explicit_format: Optional[str] = None) -> dict:
  """{position: the record's text} for a few records of one file, read
  again (the dead-letter text of a duplicate). Text formats give the line
  as written; Avro and Parquet the record's values as JSON."""
  wanted = sorted(set(positions))
  fmt = format_of(path, explicit_format)
  if fmt in ('jsonl', 'csv'):
    _, data = _range_bytes(path, 0, None)
    lines = (fmt == 'csv' and _csv_records(data)) or _lines(data)
    skip = 1 if fmt == 'csv' else 0   # the header line
    return {p: lines.line(p + skip) for p in wanted
            if p + skip < len(lines)}
  found = {}
  for batch in read_batches(path, dataset, explicit_format):
    first = batch.column(POSITION)[0].as_py() if batch.num_rows else 0
    rows = [p - first for p in wanted if 0 <= p - first < batch.num_rows]
    for raw in raw_records(batch, rows):
      found[raw.position] = raw.text
  return found


def read_file(path: str, dataset: Dataset,
              explicit_format: Optional[str] = None) -> Iterator[RawRecord]:
  """Every record of one file, one RawRecord each (the streaming replay)."""
  for batch in read_batches(path, dataset, explicit_format):
    yield from raw_records(batch)


class ReadRecords(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch] of raw batches (module docstring)
  from a glob of local or gs:// files.

  The format comes from each file's extension (.jsonl, .csv, .avro,
  .parquet, each optionally .gz) unless `input_format` names one.
  """

  def __init__(self, pattern: str, dataset: Dataset,
               input_format: Optional[str] = None,
               split_bytes: int = SPLIT_BYTES):
    super().__init__()
    self._pattern, self._dataset = pattern, dataset
    self._format, self._split = input_format, split_bytes

  def expand(self, pbegin):
    fmt, split = self._format, self._split
    return (
        pbegin
        | 'MatchFiles' >> fileio.MatchFiles(self._pattern)
        | 'SplitIntoRanges' >> beam.FlatMap(
            lambda meta: file_ranges(meta.path, meta.size_in_bytes, fmt,
                                     split))
        | 'SpreadRangesOverWorkers' >> beam.Reshuffle()
        | 'DecodeRanges' >> beam.FlatMap(read_range, self._dataset))
