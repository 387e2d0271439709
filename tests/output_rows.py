"""Reading a run's outputs back for comparisons, on any file system Beam
knows (local, gs://, s3://): shared by the runner and object-store tests."""

import json

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems


def read_rows(pattern, key='transaction_id'):
  """Rows of every Parquet file matching `pattern`, sorted by `key`."""
  rows = []
  for meta in FileSystems.match([pattern])[0].metadata_list:
    with FileSystems.open(meta.path) as f:
      rows += pq.read_table(f).to_pylist()
  return sorted(rows, key=lambda r: r[key])


def read_dead_letters(pattern):
  """Dead-letter rows, with the source file's folder dropped."""
  rows = []
  for meta in FileSystems.match([pattern])[0].metadata_list:
    with FileSystems.open(meta.path) as f:
      rows += [json.loads(l) for l in f.read().decode().splitlines() if l]
  for row in rows:
    folder = row['source_file'].rsplit('/', 1)[0] + '/'
    row['source_file'] = row['source_file'].rsplit('/', 1)[-1]
    # A duplicate's message names where the first copy was read.
    row['message'] = row['message'].replace(folder, '')
  return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
