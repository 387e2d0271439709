"""ReadRecords: files of raw records (JSON lines, CSV, Avro, Parquet) -> RawRecord.

Decoding a record's bytes into a mapping happens here, record by record, so a
line that is not JSON or a CSV row with the wrong number of columns becomes a
RawRecord with `error` set: it is counted as read and dead-lettered by the
parser, never dropped.
"""

import contextlib
import csv
import gzip
import io
import json
import os
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.filesystem import CompressionTypes

FORMATS = ('jsonl', 'csv', 'avro', 'parquet')
_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.ndjson': 'jsonl',
               '.csv': 'csv', '.avro': 'avro', '.parquet': 'parquet'}


class InputError(ValueError):
  """The input cannot be read at all (no files, unknown format)."""


class RawRecord(NamedTuple):
  source: str               # file the record came from
  position: int             # 0-based record number in that file
  text: str                 # the raw record as text, for the dead-letter row
  values: Optional[dict]    # decoded field -> value; None when error is set
  error: Optional[str] = None


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


def _json_text(values: dict) -> str:
  return json.dumps(values, sort_keys=True, default=str)


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


def read_jsonl(path: str) -> Iterator[RawRecord]:
  with _open(path) as f:
    position = 0
    for raw in io.TextIOWrapper(f, encoding='utf-8', errors='replace'):
      line = raw.rstrip('\r\n')
      if not line.strip():
        continue
      try:
        values = json.loads(line)
      except ValueError as e:
        yield RawRecord(path, position, line, None, f'not valid JSON: {e}')
      else:
        if isinstance(values, dict):
          yield RawRecord(path, position, line, values)
        else:
          yield RawRecord(path, position, line, None,
                          'a JSON line must be an object')
      position += 1


def read_csv(path: str) -> Iterator[RawRecord]:
  """One record per line after the header; quoted fields may not span lines."""
  with _open(path) as f:
    lines = io.TextIOWrapper(f, encoding='utf-8', errors='replace',
                             newline='')
    header = None
    position = 0
    for raw in lines:
      line = raw.rstrip('\r\n')
      if not line.strip():
        continue
      try:
        row = next(csv.reader([line]))
      except csv.Error as e:
        row, error = None, f'not valid CSV: {e}'
      else:
        error = None
      if header is None:
        if row is None:
          raise InputError(f'{path}: unreadable CSV header: {error}')
        header = row
        continue
      if row is not None and len(row) != len(header):
        error = f'expected {len(header)} columns, found {len(row)}'
      if error:
        yield RawRecord(path, position, line, None, error)
      else:
        yield RawRecord(path, position, line, dict(zip(header, row)))
      position += 1


def read_avro(path: str) -> Iterator[RawRecord]:
  import fastavro
  with _open(path) as f:
    for position, values in enumerate(fastavro.reader(f)):
      yield RawRecord(path, position, _json_text(values), dict(values))


def read_parquet(path: str) -> Iterator[RawRecord]:
  import pyarrow.parquet as pq
  with _open(path) as f:
    position = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=10000):
      for values in batch.to_pylist():
        yield RawRecord(path, position, _json_text(values), values)
        position += 1


_READERS = {'jsonl': read_jsonl, 'csv': read_csv, 'avro': read_avro,
            'parquet': read_parquet}


def read_file(path: str, explicit_format: Optional[str] = None):
  return _READERS[format_of(path, explicit_format)](path)


class ReadRecords(beam.PTransform):
  """PBegin -> PCollection[RawRecord], from a glob of local or gs:// files.

  The format comes from each file's extension (.jsonl, .csv, .avro,
  .parquet, each optionally .gz) unless `input_format` names one.
  """

  def __init__(self, pattern: str, input_format: Optional[str] = None):
    super().__init__()
    self._pattern = pattern
    self._format = input_format

  def expand(self, pbegin):
    fmt = self._format
    return (
        pbegin
        | 'MatchFiles' >> fileio.MatchFiles(self._pattern)
        | 'PathOfEachFile' >> beam.Map(lambda meta: meta.path)
        | 'SpreadFilesOverWorkers' >> beam.Reshuffle()
        | 'DecodeRecords' >> beam.FlatMap(read_file, fmt))
