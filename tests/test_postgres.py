"""PostgreSQL in and out, against a cluster of Debian's `postgresql` started
for the session (tests.postgres_server: initdb in a temp folder, 127.0.0.1,
a free port; as `nobody` when the tests run as root, as in CI).

The data: the first records of the committed sample that PostgreSQL can
type (their event times are RFC 3339), plus hand-made broken ones, both as
a JSON-lines file and as a table whose amount column is text (so it can
hold a value that is not a number) and whose event time is timestamptz.
The `postgres` fixture (the session's cluster) comes from conftest.py.
"""

import glob
import json
import os
import re

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import batch
from schemas.dataset import load_dataset
from tests.postgres_server import DroppingProxy, free_port
from transforms import postgres_read, postgres_sink
from transforms.common import DEAD_LETTER, VALID
from transforms.parse import ParseAndValidate
from transforms.postgres import PostgresRunError, with_retries
from transforms.read import ReadRecords
from transforms.sinks import WriteJsonLines, WriteParquet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, 'data', 'sample', 'transactions.jsonl')
ROWS = 1500          # sample records taken
RANGE_ROWS = 400     # so the table is read in four key ranges
_RFC3339 = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$')
COLUMNS = ('transaction_id', 'user_id', 'merchant_id', 'merchant_category',
           'amount', 'currency', 'channel', 'country', 'event_time',
           'is_fraud')


def _records():
  """Sample records PostgreSQL can hold as typed, then the broken ones."""
  records = []
  with open(SAMPLE, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if (isinstance(record, dict) and set(record) == set(COLUMNS) and
          isinstance(record['event_time'], str) and
          _RFC3339.match(record['event_time']) and
          record['is_fraud'] in (0, 1) and
          all(not isinstance(record[c], (dict, list, bool)) for c in COLUMNS)):
        records.append(record)
      if len(records) == ROWS:
        break
  base = dict(records[10])
  broken = [
      dict(base, transaction_id='tx900000001', amount='abc'),   # type_error
      dict(base, transaction_id='tx900000002', event_time=None),  # NULL
      dict(base, transaction_id='tx900000003', user_id=None),     # NULL
      dict(base, transaction_id='tx900000004', merchant_category='casino'),
      # A later copy of records[5]: a duplicate, its text read again.
      dict(records[5], event_time='2026-12-31T00:00:00Z'),
  ]
  return records + broken


def _text(value):
  return None if value is None else str(value)


@pytest.fixture(scope='module')
def table_and_file(postgres, tmp_path_factory):
  """(URL of table tx, path of the same records as JSON lines)."""
  import adbc_driver_postgresql.dbapi as pg  # pylint: disable=import-outside-toplevel
  records = _records()
  folder = tmp_path_factory.mktemp('pg-input')
  path = str(folder / 'transactions.jsonl')
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
  url = postgres.create_database('source')
  staging = pa.table({c: pa.array([_text(r[c]) for r in records], pa.string())
                      for c in COLUMNS})
  with pg.connect(url) as conn, conn.cursor() as cursor:
    cursor.adbc_ingest('staging', staging.to_reader(), mode='create')
    conn.commit()
  postgres.execute(
      'CREATE TABLE tx AS SELECT transaction_id, user_id, merchant_id, '
      'merchant_category, amount, currency, channel, country, '
      'event_time::timestamptz AS event_time, is_fraud::integer AS is_fraud '
      'FROM staging', 'source')
  return postgres.url('source', table='tx', range_rows=RANGE_ROWS), path


def _ingest(inputs, out, runner=('--runner', 'DirectRunner')):
  """Reads each input and parses it (default on the DirectRunner); valid
  rows to <out>/<i>/valid-*.parquet, dead letters to <out>/<i>/dead*.jsonl."""
  dataset = load_dataset('transactions')
  with beam.Pipeline(options=PipelineOptions(list(runner))) as p:
    for i, input_ in enumerate(inputs):
      parsed = (p | f'Read[{i}]' >> ReadRecords(input_, dataset)
                | f'Parse[{i}]' >> ParseAndValidate(dataset, num_shards=4))
      parsed[VALID] | f'WriteValid[{i}]' >> WriteParquet(
          os.path.join(out, str(i), 'valid'), dataset.batch_schema())
      parsed[DEAD_LETTER] | f'WriteDead[{i}]' >> WriteJsonLines(
          os.path.join(out, str(i), 'dead'))


def _valid(folder):
  rows = [r for path in sorted(glob.glob(os.path.join(folder, 'valid*')))
          for r in pq.read_table(path).to_pylist()]
  return sorted(rows, key=lambda r: r['transaction_id'])


def _dead(folder):
  rows = []
  for path in glob.glob(os.path.join(folder, 'dead*')):
    with open(path, encoding='utf-8') as f:
      rows += [json.loads(line) for line in f if line.strip()]
  return rows


def _dead_key(row):
  """A dead letter without where it was read: the record's id (from its
  text), kind, field and message (a duplicate's message names the place
  of the first copy, so only its first words)."""
  try:
    record_id = json.loads(row['raw']).get('transaction_id')
  except (TypeError, ValueError):
    record_id = row['raw']
  message = row['message']
  if row['error_kind'] == 'duplicate':
    message = message.split(' already read at ')[0]
  return (str(record_id), row['error_kind'], row['field'] or '', message)


def test_table_gives_the_same_records_and_dead_letters_as_jsonl(
    table_and_file, tmp_path):
  url, path = table_and_file
  # The same rows from a query (--input_query, --input_db).
  query = postgres_read.input_url(
      None, 'SELECT * FROM tx WHERE amount IS NOT NULL',
      url.replace('table=tx&', ''))
  _ingest([path, url, query], str(tmp_path))
  file_valid, table_valid = _valid(tmp_path / '0'), _valid(tmp_path / '1')
  file_dead, table_dead = _dead(tmp_path / '0'), _dead(tmp_path / '1')
  # 1505 records: the 1500 sample records, less the sample's own broken
  # ones, and the five made broken.
  assert len(file_valid) + len(file_dead) == ROWS + 5
  assert len(table_valid) + len(table_dead) == ROWS + 5
  assert table_valid == file_valid
  assert _valid(tmp_path / '2') == file_valid
  assert sorted(map(_dead_key, _dead(tmp_path / '2'))) == sorted(
      map(_dead_key, file_dead))
  assert sorted(map(_dead_key, table_dead)) == sorted(map(_dead_key,
                                                          file_dead))
  kinds = {(k[0], k[1], k[2]) for k in map(_dead_key, table_dead)}
  assert {('tx900000001', 'type_error', 'amount'),
          ('tx900000002', 'missing_required', 'event_time'),
          ('tx900000003', 'missing_required', 'user_id'),
          ('tx900000004', 'not_allowed', 'merchant_category')} <= kinds
  # Each table dead letter names the table and the record's place in key
  # order; the duplicate's text was read again from the table.
  source = postgres_read.source_of(url, load_dataset('transactions')).name
  assert {r['source_file'] for r in table_dead} == {source}
  assert 'table=tx' in source and 'key=transaction_id' in source
  duplicate = [r for r in table_dead if r['error_kind'] == 'duplicate']
  assert len(duplicate) == 1
  assert json.loads(duplicate[0]['raw'])['transaction_id'] == (
      _records()[5]['transaction_id'])
  positions = sorted(r['position'] for r in table_dead)
  assert len(set(positions)) == len(positions)
  assert all(0 <= p < ROWS + 5 for p in positions)


def test_table_reads_the_same_on_the_portable_runner(table_and_file,
                                                     tmp_path):
  # The portable path Flink takes (the job service in this process,
  # LOOPBACK workers): key ranges split, reshuffled and read by the SDK
  # worker.
  url, path = table_and_file
  _ingest([path, url], str(tmp_path), (
      '--runner', 'PortableRunner', '--job_endpoint', 'embed',
      '--environment_type', 'LOOPBACK'))
  assert _valid(tmp_path / '1') == _valid(tmp_path / '0')
  assert len(_valid(tmp_path / '1')) > ROWS - 100
  assert sorted(map(_dead_key, _dead(tmp_path / '1'))) == sorted(
      map(_dead_key, _dead(tmp_path / '0')))


def test_source_splits_into_key_ranges_covering_every_row(table_and_file):
  url, _ = table_and_file
  dataset = load_dataset('transactions')
  source = postgres_read.source_of(url, dataset)
  ranges = postgres_read.key_ranges(source, dataset)
  # 1505 rows at 400 a range: four ranges, starting where the previous
  # one's rows end.
  assert len(ranges) == 4
  counts = [sum(b.num_rows for b in postgres_read.read_range(r, dataset))
            for r in ranges]
  assert sum(counts) == ROWS + 5
  assert [r.start for r in ranges] == [0, counts[0], sum(counts[:2]),
                                       sum(counts[:3])]


def test_dropped_connection_is_retried_and_the_range_read_whole(
    table_and_file, postgres, monkeypatch):
  url, _ = table_and_file
  dataset = load_dataset('transactions')
  whole = postgres_read.source_of(url.replace('range_rows=400',
                                              'range_rows=100000'), dataset)
  [one_range] = postgres_read.key_ranges(whole, dataset)
  expected = pa.Table.from_batches(
      list(postgres_read.read_range(one_range, dataset)))
  # Batches of ~16 KB, so the cut (after 64 KB) falls after some whole
  # batches: the retry goes on from the rows already read.
  monkeypatch.setattr(postgres_read, 'BATCH_BYTES', 16 << 10)
  proxy = DroppingProxy(postgres.port, drop_after=64 << 10)
  try:
    cut = one_range._replace(source=whole._replace(
        url=whole.url.replace(f':{postgres.port}/', f':{proxy.port}/')))
    batches = list(postgres_read.read_range(cut, dataset))
  finally:
    proxy.close()
  assert proxy.dropped == 1
  assert len(batches) > 1
  got = pa.Table.from_batches(batches)
  assert got.num_rows == ROWS + 5
  assert got.column('__position').to_pylist() == list(range(ROWS + 5))
  assert got.column('transaction_id').to_pylist() == (
      expected.column('transaction_id').to_pylist())


def test_a_connection_that_keeps_failing_stops_with_a_run_error():
  from adbc_driver_manager import AdbcStatusCode, dbapi  # pylint: disable=import-outside-toplevel
  calls = []

  def attempt(number):
    calls.append(number)
    raise dbapi.OperationalError('server closed the connection',
                                 status_code=AdbcStatusCode.IO)
  with pytest.raises(PostgresRunError, match='failed 3 times'):
    with_retries('reading', attempt, retries=2, first_wait=0)
  assert calls == [0, 1, 2]
  with pytest.raises(dbapi.ProgrammingError):   # a SQL error: no retry
    with_retries('reading', lambda _: (_ for _ in ()).throw(
        dbapi.ProgrammingError('syntax error',
                               status_code=AdbcStatusCode.INVALID_ARGUMENT)),
                      retries=2, first_wait=0)


def _write(url, run_id, ids, shards):
  dataset = load_dataset('transactions')
  batch = pa.RecordBatch.from_pydict({
      'transaction_id': ids, 'amount': [float(i) for i in range(len(ids))]})
  with beam.Pipeline(options=PipelineOptions(['--runner', 'DirectRunner'])
                     ) as p:
    (p | beam.Create([batch.slice(0, 3), batch.slice(3)])
     | postgres_sink.WriteToPostgres(url, dataset, postgres_sink.FEATURES,
                                     run_id, shards))


def _count(postgres, db, where):
  return int(postgres.execute(
      f'SELECT count(*) FROM transactions_features WHERE {where}', db))


def test_rerun_replaces_its_own_rows_and_leaves_other_runs(postgres):
  url = postgres.create_database('sink')
  dataset = load_dataset('transactions')
  ids = [f'tx{i:09d}' for i in range(10)]
  postgres_sink.check(url, dataset)
  postgres_sink.prepare(url, dataset, 'run-a')
  _write(url, 'run-a', ids, shards=3)
  postgres_sink.prepare(url, dataset, 'run-b')
  _write(url, 'run-b', ids[:4], shards=3)
  # The same shards written again (a retried shard): replaced, not added.
  _write(url, 'run-a', ids, shards=3)
  assert _count(postgres, 'sink', "run_id = 'run-a'") == 10
  # A rerun with other shards: prepare clears the run, then it is written.
  postgres_sink.prepare(url, dataset, 'run-a')
  _write(url, 'run-a', ids[:7], shards=5)
  assert _count(postgres, 'sink', "run_id = 'run-a'") == 7
  assert int(postgres.execute(
      "SELECT count(DISTINCT transaction_id) FROM transactions_features "
      "WHERE run_id = 'run-a'", 'sink')) == 7
  assert _count(postgres, 'sink', "run_id = 'run-b'") == 4
  # The table's columns come from the declaration's types.
  types = dict(line.split('|') for line in postgres.execute(
      "SELECT column_name, data_type FROM information_schema.columns WHERE "
      "table_name = 'transactions_features'", 'sink').splitlines())
  assert types['amount'] == 'double precision'
  assert types['event_time'] == 'timestamp with time zone'
  assert types['transaction_id'] == 'text'


def test_batch_run_from_postgres_into_postgres(table_and_file, postgres,
                                               report_runs, tmp_path, capsys):
  # Scores with the model of the shared report runs (conftest): no
  # transform or training here.
  url, _ = table_and_file
  sink = postgres.create_database('gold')
  out = str(tmp_path / 'run1')
  code = batch.main(['--input', url, '--sink', sink, '--output_dir', out,
                     '--no-fail_on_anomalies', '--shards', '4', '--no-train',
                     '--model_dir', str(report_runs.full / 'model')])
  assert code == 0, capsys.readouterr().err
  with open(os.path.join(out, batch.SUMMARY_FILE), encoding='utf-8') as f:
    summary = json.load(f)
  source = postgres_read.source_of(url, load_dataset('transactions')).name
  assert summary['records_read_by_source'] == {source: ROWS + 5}
  assert summary['records_read'] == (summary['records_valid'] +
                                     summary['records_dead_lettered'])
  rows = summary['sink']['rows']
  assert summary['sink']['run_id'] == 'run1'
  for table, expected in (
      ('transactions_features', summary['feature_rows']),
      ('transactions_predictions', summary['predictions_written']),
      ('transactions_dead_letter', summary['records_dead_lettered'])):
    assert rows[table] == expected > 0
    assert int(postgres.execute(
        f"SELECT count(*) FROM {table} WHERE run_id = 'run1'", 'gold')) == (
            expected)


def test_preflight_stops_with_exit_2_when_the_database_does_not_answer(
    tmp_path, capsys):
  nowhere = f'postgresql://postgres@127.0.0.1:{free_port()}/db'
  out = str(tmp_path / 'out')
  assert batch.main(['--input', nowhere + '?table=tx',
                     '--output_dir', out]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'does not answer' in err
  assert batch.main(['--sink', nowhere, '--output_dir', out]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and '--sink' in err
  assert not os.path.exists(os.path.join(out, batch.SUMMARY_FILE))


def test_preflight_names_a_missing_table_or_key(table_and_file, capsys,
                                                tmp_path):
  url, _ = table_and_file
  out = str(tmp_path / 'out')
  assert batch.main(['--input', url.replace('table=tx', 'table=nope'),
                     '--output_dir', out]) == 2
  assert 'nope' in capsys.readouterr().err
  assert batch.main(['--input', url + '&key=no_such_column',
                     '--output_dir', out]) == 2
  assert 'no_such_column' in capsys.readouterr().err


def test_cluster_runs_unprivileged_when_tests_run_as_root(postgres):
  data = postgres.execute('SHOW data_directory').strip()
  owner = os.stat(data).st_uid
  assert (owner != 0) if os.geteuid() == 0 else owner == os.geteuid()


def test_a_postgres_input_where_only_files_work_is_exit_2(tmp_path, capsys):
  from pipelines import streaming  # pylint: disable=import-outside-toplevel
  url = f'postgresql://postgres@127.0.0.1:{free_port()}/db?table=tx'
  assert streaming.main(['--input', url, '--output_dir',
                         str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'pipelines.batch only' in err
