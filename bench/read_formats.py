"""Reading speed and memory of each input format (transforms.read).

    python -m bench.read_formats --rows 200000
    PYTHONPATH=<other checkout> python -m bench.read_formats --rows 200000

Generates the rows once per size with pipelines.generate (cached under
bench/.cache/formats-n<rows>/, as .jsonl, .jsonl.gz, .csv, .csv.gz, .avro,
.parquet), then reads every file with `read_batches` three times in this
process and prints, per file: the best wall time, records/s, and the
peak of the NumPy and Python memory of one read (tracemalloc, a separate
read; Arrow's own pool is not traced). The load average before and after
goes beside the table: compare two checkouts only at a similar load.
"""

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('transactions.jsonl', 'transactions.jsonl.gz', 'transactions.csv',
         'transactions.csv.gz', 'transactions.avro', 'transactions.parquet')


def load_average() -> str:
  with open('/proc/loadavg') as f:
    return ' '.join(f.read().split()[:3])


def _generate(directory: str, rows: int):
  os.makedirs(directory, exist_ok=True)
  for name in NAMES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      continue
    if name.endswith('.gz'):
      with open(path[:-3], 'rb') as f, gzip.open(path, 'wb', 6) as out:
        shutil.copyfileobj(f, out)
      continue
    subprocess.run([sys.executable, '-m', 'pipelines.generate', '--rows',
                    str(rows), '--seed', '1', '--output', path], check=True,
                   cwd=ROOT)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', type=int, default=200000)
  args = p.parse_args(argv)
  directory = os.path.join(ROOT, 'bench', '.cache', f'formats-n{args.rows}')
  _generate(directory, args.rows)
  from schemas.dataset import load_dataset  # pylint: disable=g-import-not-at-top
  from transforms.read import read_batches  # pylint: disable=g-import-not-at-top
  dataset = load_dataset()
  print(f'load before: {load_average()}')
  print('| file | MB | records | best s | records/s | traced peak MB |')
  print('|---|---|---|---|---|---|')
  for name in NAMES:
    path = os.path.join(directory, name)
    best = None
    for _ in range(3):
      start = time.perf_counter()
      rows = sum(b.num_rows for b in read_batches(path, dataset))
      took = time.perf_counter() - start
      best = took if best is None else min(best, took)
    tracemalloc.start()
    for _ in read_batches(path, dataset):
      pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f'| {name} | {os.path.getsize(path) / 1e6:.1f} | {rows:,} | '
          f'{best:.2f} | {rows / best:,.0f} | {peak / 1e6:.0f} |')
  print(f'load after: {load_average()}')


if __name__ == '__main__':
  main()
