"""Reading raw records from PostgreSQL: a table or a query, in ranges of a
key, each range streamed as Arrow RecordBatches by binary COPY (ADBC's
libpq driver), so the batch path after the read is the files' own.

    --input 'postgresql://user@host:port/db?table=transactions'
    --input_query 'SELECT ...' --input_db 'postgresql://user@host:port/db'

`key=COLUMN` in the URL names the key (default: the declaration's id). A
source is split into ranges of about `range_rows` rows (URL parameter,
default RANGE_ROWS) at quantiles of the key (`percentile_disc`, so any
ordered type splits: integers, text, timestamps); the ranges are spread
over the workers and each is read in key order. A record's position is its
rank in key order over the whole source (ties in the server's order), so a
dead-letter row names the table (SOURCE) and the record's place; its RAW
holds the record's values, the key among them, as JSON.

Columns are read in their own Arrow types where the parser takes them
(integers, floats, text, timestamptz) and as their text otherwise (numeric,
timestamp without zone, date, boolean, json, ...), which the declaration's
parsing then judges as it judges a CSV value: a NULL in a required field
is `missing_required`, a value of the wrong type a `type_error`.

A connection dropped mid-range is retried (transforms.postgres.RETRIES
times, with backoff) and the range goes on after the rows already read
(OFFSET in key order), so the range is read whole and once; past the
retries the run fails (exit 3), never with a silent partial read. The
source is assumed not to change during the run.
"""

import math
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence
from urllib.parse import urlencode, urlsplit

import apache_beam as beam
import pyarrow as pa

from schemas.dataset import Dataset
from transforms.common import json_row
from transforms.formats.raw import BATCH_ROWS, raw_batch
from transforms.postgres import (RETRIES, STANDARD_STRINGS,
                                 PostgresRunError, PostgresUsageError,
                                 connect, connection_problem, display_url,
                                 first_line, identifier,
                                 is_dropped_connection, is_postgres, literal,
                                 split_url, with_retries)

# Rows per range: a million-row table is four ranges.
RANGE_ROWS = 250_000
# About how many bytes the driver gathers into one Arrow batch of a range.
BATCH_BYTES = 4 << 20
# PostgreSQL types read in their own Arrow type; any other is read as text.
_NATIVE = ('int2', 'int4', 'int8', 'float4', 'float8', 'text', 'varchar',
           'bpchar', 'name', 'timestamptz')


class PgSource(NamedTuple):
  """One PostgreSQL source: where, what (a table or a query) and its key."""
  url: str                 # libpq URL (our parameters taken out)
  table: Optional[str]
  query: Optional[str]
  key: str
  range_rows: int = RANGE_ROWS

  @property
  def name(self) -> str:
    """The source as dead-letter rows and summaries name it: the URL
    without a password, with the table or query and the key."""
    what = {'table': self.table} if self.table else {'query': self.query}
    base = display_url(self.url)
    sep = '&' if urlsplit(base).query else '?'
    return base + sep + urlencode({**what, 'key': self.key})

  def relation(self) -> str:
    if self.table:
      return identifier(self.table)
    return f'({self.query}) AS source'


def input_url(input_: str, query: Optional[str], db: Optional[str]) -> str:
  """--input, or --input_db with --input_query as one URL."""
  if query or db:
    if not (query and db):
      raise PostgresUsageError('--input_query and --input_db go together: '
                               'the query and the database it runs on')
    if not is_postgres(db):
      raise PostgresUsageError(f'--input_db {display_url(db)} is not a '
                               'postgresql:// URL')
    sep = '&' if urlsplit(db).query else '?'
    return db + sep + urlencode({'query': query})
  return input_


def source_of(url: str, dataset: Dataset) -> PgSource:
  """The PgSource a postgresql:// URL names (PostgresUsageError if it
  names none)."""
  libpq_url, ours = split_url(url)
  table, query = ours.get('table'), ours.get('query')
  if bool(table) == bool(query):
    raise PostgresUsageError(
        f'--input {display_url(libpq_url)}: name a table (?table=NAME) or '
        'give --input_query with --input_db')
  key = ours.get('key') or dataset.id_field
  if not key:
    raise PostgresUsageError(
        f'--input {display_url(libpq_url)}: {dataset.name} declares no id, '
        'so name the key to read by: &key=COLUMN')
  try:
    range_rows = int(ours.get('range_rows') or RANGE_ROWS)
  except ValueError:
    range_rows = 0
  if range_rows <= 0:
    raise PostgresUsageError(f'range_rows={ours.get("range_rows")}: give a '
                             'positive number of rows per range')
  return PgSource(libpq_url, table, query, key, range_rows)


def _session(conn):
  with conn.cursor() as cursor:
    cursor.execute(STANDARD_STRINGS)
  return conn


def _columns(conn, source: PgSource) -> Dict[str, str]:
  """{column: PostgreSQL type name} of the source, in its order."""
  with conn.cursor() as cursor:
    cursor.execute(f'SELECT * FROM {source.relation()} LIMIT 0')
    schema = cursor.fetch_arrow_table().schema
  return {f.name: (f.metadata or {}).get(b'POSTGRESQL:type', b'').decode()
          for f in schema}


def _select_list(columns: Dict[str, str], dataset: Dataset) -> str:
  """The declared fields the source has, cast to text where not native."""
  parts = []
  for name in dataset.input_fields:
    if name not in columns:
      continue   # absent: missing in every record, as in a file
    ident = identifier(name)
    parts.append(ident if columns[name] in _NATIVE
                 else f'{ident}::text AS {ident}')
  return ', '.join(parts) or 'NULL AS "__none"'


def check_source(url: str, dataset: Dataset) -> PgSource:
  """Preflight: the server answers, the table or query runs and has the
  key. Raises PostgresUsageError with one line."""
  source = source_of(url, dataset)
  problem = connection_problem(source.url)
  if problem:
    raise PostgresUsageError(f'--input {source.name}: the database does not '
                             f'answer ({problem})')
  try:
    with connect(source.url) as conn:
      columns = _columns(_session(conn), source)
  except Exception as e:  # pylint: disable=broad-except
    raise PostgresUsageError(f'--input {source.name}: '
                             f'{first_line(e)}') from None
  if source.key not in columns:
    raise PostgresUsageError(f'--input {source.name}: no key column '
                             f'{source.key!r} (columns: '
                             f'{", ".join(columns)}); name one with &key=')
  return source


class KeyRange(NamedTuple):
  """Rows of a source with lower <= key < upper (None: unbounded; rows
  whose key is NULL go to the first range), the first at `start` in key
  order."""
  source: PgSource
  select: str
  lower: Optional[str]
  upper: Optional[str]
  start: int


def _where(key: str, lower: Optional[str], upper: Optional[str]) -> str:
  conditions = []
  if lower is not None:
    conditions.append(f'{key} >= {literal(lower)}')
  if upper is not None:
    conditions.append(f'({key} < {literal(upper)}' +
                      (f' OR {key} IS NULL)' if lower is None else ')'))
  return ' WHERE ' + ' AND '.join(conditions) if conditions else ''


def _split(source: PgSource, dataset: Dataset) -> List[KeyRange]:
  with connect(source.url) as conn:
    _session(conn)
    select = _select_list(_columns(conn, source), dataset)
    key, relation = identifier(source.key), source.relation()
    with conn.cursor() as cursor:
      cursor.execute(f'SELECT count(*) FROM {relation}')
      rows = cursor.fetchone()[0]
      parts = max(1, math.ceil(rows / source.range_rows))
      bounds: List[str] = []
      if parts > 1:
        fractions = ', '.join(f'{i / parts:.9f}' for i in range(1, parts))
        cursor.execute(f'SELECT (percentile_disc(ARRAY[{fractions}]) WITHIN '
                       f'GROUP (ORDER BY {key}))::text[] FROM {relation}')
        found = cursor.fetchone()[0] or []
        bounds = sorted(set(b for b in found if b is not None),
                        key=found.index)
      starts = [0]
      if bounds:
        counts = ', '.join(
            f'count(*) FILTER (WHERE {key} < {literal(b)} OR {key} IS NULL)'
            for b in bounds)
        cursor.execute(f'SELECT {counts} FROM {relation}')
        starts += [int(c) for c in cursor.fetchone()]
  edges = [None] + bounds + [None]
  return [KeyRange(source, select, edges[i], edges[i + 1], starts[i])
          for i in range(len(edges) - 1)]


def key_ranges(source: PgSource, dataset: Dataset) -> List[KeyRange]:
  """The ranges `source` is read in (about range_rows rows each)."""
  return with_retries(f'{source.name}: splitting into ranges',
                      lambda _: _split(source, dataset))


def _stream(source: PgSource, sql: str) -> Iterator[pa.RecordBatch]:
  with connect(source.url) as conn:
    _session(conn)
    with conn.cursor() as cursor:
      cursor.adbc_statement.set_options(
          **{'adbc.postgresql.batch_size_hint_bytes': str(BATCH_BYTES)})
      cursor.execute(sql)
      for batch in cursor.fetch_record_batch():
        yield batch


def read_range(key_range: KeyRange, dataset: Dataset
               ) -> Iterator[pa.RecordBatch]:
  """The raw batches of one range, in key order; a dropped connection is
  retried from the rows already read (module docstring)."""
  del dataset   # the select list was made from it
  source = key_range.source
  key = identifier(source.key)
  sql = (f'SELECT {key_range.select} FROM {source.relation()}'
         f'{_where(key, key_range.lower, key_range.upper)} '
         f'ORDER BY {key} NULLS FIRST')
  position, failures, wait = key_range.start, 0, 0.5
  while True:
    done = position - key_range.start
    try:
      for batch in _stream(source, sql + (f' OFFSET {done}' if done else '')):
        for offset in range(0, batch.num_rows, BATCH_ROWS):
          part = batch.slice(offset, BATCH_ROWS)
          yield raw_batch(pa.Table.from_batches([part]), source.name,
                          position)
          position += part.num_rows
      return
    except Exception as e:  # pylint: disable=broad-except
      if not is_dropped_connection(e):
        raise
      if failures == RETRIES:
        raise PostgresRunError(
            f'{source.name}: reading keys from {key_range.lower} failed '
            f'{RETRIES + 1} times: {first_line(e)}') from e
      failures += 1
      time.sleep(wait)
      wait *= 2


def record_texts(name: str, dataset: Dataset, positions: Sequence[int]
                 ) -> Dict[int, str]:
  """{position: the record's values as JSON} for a few records of the
  source `name` (a duplicate's dead-letter text), read again."""
  source = source_of(name, dataset)
  key = identifier(source.key)

  def read():
    found = {}
    with connect(source.url) as conn:
      _session(conn)
      select = _select_list(_columns(conn, source), dataset)
      with conn.cursor() as cursor:
        for position in sorted(set(positions)):
          cursor.execute(f'SELECT {select} FROM {source.relation()} ORDER BY '
                         f'{key} NULLS FIRST OFFSET {int(position)} LIMIT 1')
          rows = cursor.fetch_arrow_table().to_pylist()
          if rows:
            found[position] = json_row(rows[0])
    return found
  return with_retries(f'{source.name}: reading records again',
                      lambda _: read())


class ReadPostgres(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch] of raw batches
  (transforms.formats.raw) of one PostgreSQL source: split into key ranges
  by one worker, the ranges spread over the workers, each streamed by
  binary COPY."""

  def __init__(self, source: PgSource, dataset: Dataset):
    super().__init__()
    self._source, self._dataset = source, dataset

  def expand(self, pbegin):
    return (pbegin
            | 'Source' >> beam.Create([self._source])
            | 'SplitIntoKeyRanges' >> beam.FlatMap(key_ranges,
                                                   self._dataset)
            | 'SpreadRangesOverWorkers' >> beam.Reshuffle()
            | 'ReadKeyRanges' >> beam.FlatMap(read_range, self._dataset))


__all__ = ['KeyRange', 'PgSource', 'RANGE_ROWS', 'ReadPostgres',
           'check_source', 'input_url', 'key_ranges', 'read_range',
           'record_texts', 'source_of']
