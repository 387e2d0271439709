"""Writing a run's tables to PostgreSQL (`--sink postgresql://...`): the
gold feature table, the predictions and the dead letters, each to a table
created from the declaration's types, every row tagged with the run id.

    <dataset>_features, <dataset>_predictions, <dataset>_dead_letter

Idempotent on rerun: before the run's jobs start, `prepare` creates the
tables (IF NOT EXISTS) and deletes the rows of this run id in one
transaction; each table is then written by shards (rows grouped by a hash
of their id: (shard, RecordBatch) pairs), one transaction per shard that
deletes the shard's rows of this run and appends them by binary COPY
(ADBC), so a shard retried by the runner, or by us after a dropped
connection, replaces itself. Rows of other run ids are never touched.
"""

from typing import Dict, Iterator, NamedTuple, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import Dataset
from transforms.common import (DEAD_LETTER_SCHEMA, Counters, concat_batches,
                               shard_of)
from transforms.postgres import (STANDARD_STRINGS, PostgresUsageError,
                                 connect, connection_problem, display_url,
                                 identifier, literal,
                                 with_retries)
from transforms.sinks import conform

RUN_ID, SHARD = 'run_id', 'run_shard'
FEATURES, PREDICTIONS, DEAD_LETTERS = 'features', 'predictions', 'dead_letter'


class SinkTable(NamedTuple):
  name: str          # the table's name in the database
  schema: pa.Schema  # its columns (before RUN_ID and SHARD)
  key: str           # the column whose hash picks a row's shard


def tables(dataset: Dataset) -> Dict[str, SinkTable]:
  """{output: its table} for the declaration."""
  id_field = dataset.id_field
  return {
      FEATURES: SinkTable(f'{dataset.name}_{FEATURES}',
                          dataset.arrow_schema(dataset.feature_types()),
                          id_field),
      PREDICTIONS: SinkTable(f'{dataset.name}_{PREDICTIONS}',
                             dataset.prediction_schema(), id_field),
      DEAD_LETTERS: SinkTable(f'{dataset.name}_{DEAD_LETTERS}',
                              DEAD_LETTER_SCHEMA, 'position'),
  }


def _sql_type(t: pa.DataType) -> str:
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    return 'text'
  if pa.types.is_timestamp(t):
    return 'timestamptz' if t.tz else 'timestamp'
  for check, name in ((pa.types.is_boolean, 'boolean'),
                      (pa.types.is_float32, 'real'),
                      (pa.types.is_floating, 'double precision'),
                      (pa.types.is_int16, 'smallint'),
                      (pa.types.is_int32, 'integer'),
                      (pa.types.is_integer, 'bigint')):
    if check(t):
      return name
  raise PostgresUsageError(f'no PostgreSQL column type for Arrow {t}')


def create_sql(table: SinkTable) -> str:
  columns = [f'{identifier(RUN_ID)} text NOT NULL',
             f'{identifier(SHARD)} integer NOT NULL']
  columns += [f'{identifier(f.name)} {_sql_type(f.type)}'
              for f in table.schema]
  index = identifier(f'{table.name}_run'.replace('.', '_'))
  return (f'CREATE TABLE IF NOT EXISTS {identifier(table.name)} '
          f'({", ".join(columns)}); CREATE INDEX IF NOT EXISTS {index} ON '
          f'{identifier(table.name)} ({identifier(RUN_ID)}, '
          f'{identifier(SHARD)})')


def _existing_columns(conn, name: str) -> Dict[str, str]:
  with conn.cursor() as cursor:
    cursor.execute(
        'SELECT column_name::text, data_type::text FROM '
        'information_schema.columns WHERE table_schema = current_schema() '
        f'AND table_name = {literal(name)} ORDER BY ordinal_position')
    return dict(cursor.fetchall())


def check(url: str, dataset: Dataset) -> None:
  """Preflight (nothing written): the server answers, and a table that is
  already there has the columns this declaration writes."""
  problem = connection_problem(url)
  if problem:
    raise PostgresUsageError(f'--sink {display_url(url)}: the database does '
                             f'not answer ({problem})')
  with connect(url) as conn:
    for table in tables(dataset).values():
      existing = _existing_columns(conn, table.name)
      wanted = [RUN_ID, SHARD] + table.schema.names
      missing = [c for c in wanted if c not in existing]
      if existing and missing:
        raise PostgresUsageError(
            f'--sink {display_url(url)}: table {table.name} has no column '
            f'{missing[0]!r} (made for another declaration?): drop it or '
            'write to another database')


def prepare(url: str, dataset: Dataset, run_id: str) -> None:
  """Creates the tables and deletes this run's rows (one transaction)."""
  def attempt(_):
    with connect(url, autocommit=False) as conn:
      with conn.cursor() as cursor:
        cursor.execute(STANDARD_STRINGS)
        for table in tables(dataset).values():
          for statement in create_sql(table).split('; '):
            cursor.execute(statement)
          cursor.execute(f'DELETE FROM {identifier(table.name)} WHERE '
                         f'{identifier(RUN_ID)} = {literal(run_id)}')
      conn.commit()
  with_retries(f'--sink {display_url(url)}: preparing the tables', attempt)


def _shards(batch, table: SinkTable, num_shards: int
            ) -> Iterator[Tuple[int, pa.RecordBatch]]:
  """(shard, rows of the batch in it) by a hash of the key column."""
  batch = conform(batch, table.schema).combine_chunks()
  if batch.num_rows == 0:
    return
  keys = batch.column(table.key).combine_chunks()
  keys = pc.fill_null(keys, pa.scalar('' if pa.types.is_string(keys.type)
                                      else 0, keys.type))
  shards = shard_of(keys, num_shards)
  for shard in np.unique(shards):
    rows = batch.filter(pa.array(shards == shard))
    for part in rows.to_batches():
      yield int(shard), part


class _WriteShard(beam.DoFn):
  """(shard, batches) -> one transaction: delete the shard's rows of this
  run, append the batches by binary COPY, commit."""

  def __init__(self, url: str, table: SinkTable, run_id: str):
    self._url, self._table, self._run_id = url, table, run_id

  def setup(self):
    self._counters = Counters()

  def process(self, element):
    shard, batches = element
    rows = concat_batches(list(batches))
    n = rows.num_rows
    schema = pa.schema([pa.field(RUN_ID, pa.string()),
                        pa.field(SHARD, pa.int32())] + list(
                            self._table.schema))
    table = pa.Table.from_arrays(
        [pa.repeat(pa.scalar(self._run_id), n),
         pa.repeat(pa.scalar(shard, pa.int32()), n)] +
        [rows.column(f.name) for f in self._table.schema], schema=schema)
    name = self._table.name

    def attempt(_):
      with connect(self._url, autocommit=False) as conn:
        with conn.cursor() as cursor:
          cursor.execute(STANDARD_STRINGS)
          cursor.execute(
              f'DELETE FROM {identifier(name)} WHERE {identifier(RUN_ID)} = '
              f'{literal(self._run_id)} AND {identifier(SHARD)} = {shard}')
          if n:
            cursor.adbc_ingest(name, pa.RecordBatchReader.from_batches(
                schema, table.to_batches()), mode='append')
        conn.commit()
    with_retries(f'--sink {display_url(self._url)}: writing {name} shard '
                 f'{shard}', attempt)
    self._counters.inc(f'sink_rows.{name}', n)
    yield n


class WriteToPostgres(beam.PTransform):
  """PCollection[pa.RecordBatch | pa.Table] -> rows of one table of the
  sink (`output`: FEATURES, PREDICTIONS or DEAD_LETTERS), tagged with
  `run_id`, written in `num_shards` shards, one transaction each (module
  docstring); returns PCollection[int] of the rows each shard wrote.
  `prepare` must have run first (the command does it before the job)."""

  def __init__(self, url: str, dataset: Dataset, output: str, run_id: str,
               num_shards: int = 8):
    super().__init__()
    self._url, self._run_id, self._shards = url, run_id, num_shards
    self._table = tables(dataset)[output]

  def expand(self, batches):
    table, shards = self._table, self._shards
    return (batches
            | 'ShardRows' >> beam.FlatMap(_shards, table, shards)
            | 'GroupShards' >> beam.GroupByKey()
            | 'WriteShard' >> beam.ParDo(_WriteShard(self._url, table,
                                                     self._run_id)))


__all__ = ['DEAD_LETTERS', 'FEATURES', 'PREDICTIONS', 'RUN_ID', 'SHARD',
           'SinkTable', 'WriteToPostgres', 'check', 'create_sql',
           'prepare', 'tables']
