"""Reading raw records: files into Arrow RecordBatches (batch), and the
same records one RawRecord at a time (the replay, transforms.stream_sources).

Batch. `ReadRecords` turns a glob into PCollection[pa.RecordBatch] of raw
batches (transforms.formats.raw: one row per record, the declared fields as
the file gave them plus SOURCE, POSITION, RAW, ERROR, ERROR_KIND and
UNDECODED). Each format is one module of transforms.formats, which says
how a file of it splits and reads a range of it; this module matches the
files, splits them into ranges, spreads the ranges over the workers and
turns a break in a file into one `unreadable_file` row. A postgresql://
URL is read by transforms.postgres_read instead, and an http(s):// URL (a
paginated JSON API) by transforms.http_source, into the same raw batches.
"""

from typing import Iterator, List, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
import pyarrow as pa

from schemas.dataset import Dataset
from transforms import http_source
from transforms.common import CountRows
from transforms.formats import format_named, format_of
from transforms.formats.base import InputError
from transforms import postgres_read
from transforms.postgres import is_postgres
from transforms.formats.raw import (ERROR, ERROR_KIND, META_COLUMNS, POSITION,
                                    RAW, SOURCE, UNDECODED, RawRecord,
                                    raw_batch, raw_records, unreadable_batch)

__all__ = ['ERROR', 'ERROR_KIND', 'META_COLUMNS', 'POSITION', 'RAW', 'SOURCE',
           'UNDECODED', 'InputError', 'RawRecord', 'ReadRecords', 'FileRange',
           'check_input', 'file_ranges', 'raw_batch', 'raw_records',
           'read_batches', 'read_file', 'read_range', 'record_texts',
           'unreadable_batch']

# Bytes per range of a splittable file.
SPLIT_BYTES = 64 << 20


def check_input(pattern: str, explicit_format: Optional[str] = None,
                dataset: Optional[Dataset] = None):
  """Preflight: the pattern matches files of a known format. Returns paths
  (none for a postgresql:// source, whose server, table and key are
  checked instead; an http(s):// API: its URL, once its first page
  answered, see transforms.http_source)."""
  if is_postgres(pattern):
    if dataset is None:
      raise InputError(f'{postgres_read.display_url(pattern)}: a PostgreSQL '
                       'source is read by pipelines.batch only (give files '
                       'here)')
    postgres_read.check_source(pattern, dataset)
    return []
  if http_source.is_http(pattern) and dataset is not None:
    return [http_source.check_source(pattern, dataset)]
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


class FileRange(NamedTuple):
  path: str
  format: str
  start: int = 0              # byte offset, or first row group (Parquet)
  end: Optional[int] = None   # None: to the end of the file


def file_ranges(path: str, size: int, explicit_format: Optional[str] = None,
                split_bytes: int = SPLIT_BYTES) -> List[FileRange]:
  """How one file is read: whole when it is small or compressed (a .gz
  cannot be entered mid-way), else in the ranges its format splits it
  into (byte ranges, row groups)."""
  fmt = format_of(path, explicit_format)
  if path.endswith('.gz') or size <= split_bytes:
    return [FileRange(path, fmt)]
  return [FileRange(path, fmt, start, end) for start, end in
          format_named(fmt).ranges(path, size, split_bytes)]


def read_range(file_range: FileRange, dataset: Dataset
               ) -> Iterator[pa.RecordBatch]:
  """Raw batches of one range. A file that breaks mid-way ends with one
  `unreadable_file` row naming where; the records before it stand."""
  position = 0
  try:
    for batch in format_named(file_range.format).batches(
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
  again (the dead-letter text of a duplicate). Text formats give the
  record as written; Avro, Parquet and PostgreSQL the record's values as
  JSON; an API page (read again, transforms.http_source) its records as
  JSON."""
  if is_postgres(path):
    return postgres_read.record_texts(path, dataset, positions)
  if http_source.is_http(path):
    return http_source.record_texts(path, dataset, positions)
  return format_named(format_of(path, explicit_format)).record_texts(
      path, dataset, positions)


def read_file(path: str, dataset: Dataset,
              explicit_format: Optional[str] = None) -> Iterator[RawRecord]:
  """Every record of one file, one RawRecord each (the streaming replay)."""
  for batch in read_batches(path, dataset, explicit_format):
    yield from raw_records(batch)


class ReadRecords(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch] of raw batches (module docstring)
  from a glob of local, gs:// or s3:// files, a postgresql:// source
  (transforms.postgres_read) or an http(s):// API (transforms.http_source).
  The records read are counted per source (`records_read_from.<source>`).

  The format comes from each file's extension (transforms.formats: .jsonl,
  .csv, .avro, .parquet, each optionally .gz) unless `input_format` names
  one.
  """

  def __init__(self, pattern: str, dataset: Dataset,
               input_format: Optional[str] = None,
               split_bytes: int = SPLIT_BYTES):
    super().__init__()
    self._pattern, self._dataset = pattern, dataset
    self._format, self._split = input_format, split_bytes

  def expand(self, pbegin):
    if is_postgres(self._pattern):
      source = postgres_read.source_of(self._pattern, self._dataset)
      count = CountRows(f'records_read_from.{source.name}')
      return (pbegin
              | 'ReadPostgres' >> postgres_read.ReadPostgres(source,
                                                             self._dataset)
              | 'CountPerSource' >> beam.ParDo(count))
    if http_source.is_http(self._pattern):
      return (pbegin
              | 'ReadApiPages' >> http_source.ReadHttpPages(self._pattern,
                                                           self._dataset)
              | 'CountPerSource' >> beam.ParDo(
                  CountRows(f'records_read_from.{self._pattern}')))
    fmt, split = self._format, self._split
    count = CountRows(f'records_read_from.{self._pattern}')
    return (
        pbegin
        | 'MatchFiles' >> fileio.MatchFiles(self._pattern)
        | 'SplitIntoRanges' >> beam.FlatMap(
            lambda meta: file_ranges(meta.path, meta.size_in_bytes, fmt,
                                     split))
        | 'SpreadRangesOverWorkers' >> beam.Reshuffle()
        | 'DecodeRanges' >> beam.FlatMap(read_range, self._dataset)
        | 'CountPerSource' >> beam.ParDo(count))
