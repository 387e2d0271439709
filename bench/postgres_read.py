"""Reading transactions from PostgreSQL beside the same rows from Parquet.

    python -m bench.postgres_read --rows 1000000

Generates the rows once with pipelines.generate (cached under
bench/.cache/postgres-n<rows>/transactions.parquet), starts a throwaway
cluster of Debian's PostgreSQL (tests.postgres_server: a temp folder,
127.0.0.1, a free port), loads the Parquet rows into a table by binary
COPY (event_time as timestamptz, amount as double precision), then
measures, best of three each:

  * the readers alone, in this process: `read_batches` of the Parquet file,
    and every key range of the table (`key_ranges` + `read_range`,
    transactions.postgres_read) one after another;
  * `ReadRecords` (transforms.read) in a DirectRunner job counting the raw
    rows: the split into ranges, the reshuffle, the reads.

Prints a table, with the load average before and after: the machine is
shared, compare numbers only at a similar load.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> str:
  with open('/proc/loadavg', encoding='utf-8') as f:
    return ' '.join(f.read().split()[:3])


def _best(fn, times=3):
  best, result = None, None
  for _ in range(times):
    start = time.perf_counter()
    result = fn()
    took = time.perf_counter() - start
    best = took if best is None else min(best, took)
  return best, result


def _load(server, parquet_path):
  """The Parquet rows into table `transactions`; returns seconds."""
  import adbc_driver_postgresql.dbapi as pg  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  url = server.create_database('bench')
  start = time.perf_counter()
  reader = pq.ParquetFile(parquet_path)
  with pg.connect(url) as conn, conn.cursor() as cursor:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    cursor.adbc_ingest('staging', pa.RecordBatchReader.from_batches(
        reader.schema_arrow, reader.iter_batches(65536)), mode='create')
    conn.commit()
  server.execute(
      'CREATE TABLE transactions AS SELECT transaction_id, user_id, '
      'merchant_id, merchant_category, amount::double precision AS amount, '
      'currency, channel, country, event_time::timestamptz AS event_time, '
      'is_fraud FROM staging; DROP TABLE staging; '
      'ALTER TABLE transactions ADD PRIMARY KEY (transaction_id); '
      'ANALYZE transactions', 'bench')
  return time.perf_counter() - start, url + '?table=transactions'


def _beam_count(input_, dataset) -> int:
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  from pipelines.outputs.summary import counters  # pylint: disable=import-outside-toplevel
  from transforms.common import CountRows  # pylint: disable=import-outside-toplevel
  from transforms.read import ReadRecords  # pylint: disable=import-outside-toplevel
  p = beam.Pipeline(options=PipelineOptions(['--runner', 'DirectRunner']))
  _ = (p | ReadRecords(input_, dataset)
       | beam.ParDo(CountRows('bench_rows')))
  result = p.run()
  result.wait_until_finish()
  return counters(result)['bench_rows']


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', type=int, default=1000000)
  args = p.parse_args(argv)
  directory = os.path.join(ROOT, 'bench', '.cache', f'postgres-n{args.rows}')
  os.makedirs(directory, exist_ok=True)
  parquet = os.path.join(directory, 'transactions.parquet')
  if not os.path.exists(parquet):
    subprocess.run([sys.executable, '-m', 'pipelines.generate', '--rows',
                    str(args.rows), '--seed', '1', '--output', parquet],
                   check=True, cwd=ROOT)
  from schemas.dataset import load_dataset  # pylint: disable=import-outside-toplevel
  from tests.postgres_server import PostgresServer  # pylint: disable=import-outside-toplevel
  from transforms import postgres_read  # pylint: disable=import-outside-toplevel
  from transforms.read import read_batches  # pylint: disable=import-outside-toplevel
  dataset = load_dataset()
  print(f'load before: {load_average()}', flush=True)
  with PostgresServer(tempfile.mkdtemp(prefix='bench-pg-')) as server:
    load_s, url = _load(server, parquet)
    source = postgres_read.source_of(url, dataset)
    split_s, ranges = _best(lambda: postgres_read.key_ranges(source,
                                                             dataset))
    rows = {}
    seconds = {}
    seconds['parquet'], rows['parquet'] = _best(lambda: sum(
        b.num_rows for b in read_batches(parquet, dataset)))
    seconds['postgres'], rows['postgres'] = _best(lambda: sum(
        b.num_rows for r in postgres_read.key_ranges(source, dataset)
        for b in postgres_read.read_range(r, dataset)))
    seconds['parquet_beam'], rows['parquet_beam'] = _best(
        lambda: _beam_count(parquet, dataset))
    seconds['postgres_beam'], rows['postgres_beam'] = _best(
        lambda: _beam_count(url, dataset))
  print(f'rows {args.rows:,}; loading the table (binary COPY, then typed '
        f'copy + primary key): {load_s:.1f} s; splitting into '
        f'{len(ranges)} key ranges: {split_s:.2f} s')
  print('| read | records | best s | records/s |')
  print('|---|---|---|---|')
  labels = {'parquet': 'Parquet, read_batches (in process)',
            'postgres': 'PostgreSQL, every key range (in process, split '
                        'included)',
            'parquet_beam': 'Parquet, ReadRecords on DirectRunner',
            'postgres_beam': 'PostgreSQL, ReadRecords on DirectRunner'}
  for name, label in labels.items():
    print(f'| {label} | {rows[name]:,} | {seconds[name]:.2f} | '
          f'{rows[name] / seconds[name]:,.0f} |')
  print(f'load after: {load_average()}')


if __name__ == '__main__':
  main()
