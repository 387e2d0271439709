"""What one pattern engine and the timestamp rules cost (by hand, not CI).

    python -m bench.validation [--rows 200000]

Prints, with the load average beside it:
  * BatchValidator on `rows` generated transactions (three RE2 patterns
    on the column path): rows/s;
  * one declared pattern on one value, the per-record path (the stream,
    the scoring service, doubted rows): RE2 through pyarrow vs Python's re
    (what it was), microseconds per check;
  * a timestamp composed from a day of year ('%j' with a declared year)
    and an hour, for a year of hourly rows: the column path (Arrow cannot
    be trusted with %j: the per-value definition once per distinct day)
    vs every row through the per-record definition.
"""

import argparse
import os
import re
import tempfile
import time

import pyarrow as pa

from schemas import patterns
from schemas.dataset import load_dataset
from transforms import timestamps
from transforms.parse import BatchValidator
from transforms.read import read_batches


def _best(work, repeat=3) -> float:
  times = []
  for _ in range(repeat):
    start = time.perf_counter()
    work()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', type=int, default=200_000)
  args = parser.parse_args(argv)
  load = os.getloadavg()[0]
  dataset = load_dataset()

  from pipelines.synthetic import transactions
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'tx.jsonl')
    transactions.write_records(
        transactions.generate_transactions(args.rows, seed=1), path)
    batches = list(read_batches(path, dataset))
    validator = BatchValidator(dataset)
    seconds = _best(lambda: [validator.validate(b) for b in batches], 2)
  print(f'load {load:.2f}  BatchValidator, {args.rows} transactions: '
        f'{args.rows / seconds:,.0f} rows/s')

  value, n = 'u12345', 20_000
  compiled = re.compile('^u[0-9]{5}$')
  per_re = _best(lambda: [compiled.match(value) for _ in range(n)]) / n
  per_re2 = _best(lambda: [patterns.match(value, '^u[0-9]{5}$')
                           for _ in range(n)]) / n
  print(f'load {load:.2f}  one pattern on one value: RE2 via pyarrow '
        f'{per_re2 * 1e6:.1f} us, Python re (before) {per_re * 1e6:.2f} us')

  from schemas.dataset import Field
  field = Field('at', 'timestamp', derived=True, compose={
      'date': 'day', 'hour': 'hour', 'date_format': '%j', 'year': 2011})
  days = pa.array([f'{d:03d}' for d in range(1, 366) for _ in range(24)])
  hours = pa.array([h for _ in range(1, 366) for h in range(24)], pa.int64())
  column = _best(lambda: timestamps.compose_column(field, days, hours,
                                                   len(days)))
  texts, hour_list = days.to_pylist(), hours.to_pylist()
  single = _best(lambda: [timestamps.compose_value(field, d, h)
                          for d, h in zip(texts, hour_list)])
  print(f'load {load:.2f}  %j + hour, {len(days)} hourly rows: column path '
        f'{len(days) / column:,.0f} rows/s, per record '
        f'{len(days) / single:,.0f} rows/s')


if __name__ == '__main__':
  main()
