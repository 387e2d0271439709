"""Small file helpers that work the same on local paths and gs://."""

import json

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems


def join(*parts: str) -> str:
  return FileSystems.join(*parts)


def clear(path: str):
  """Deletes the folder `path` and everything in it, if there is any, so
  that no shard of an earlier run is mixed with this run's shards.

  Object stores have no folders (gs://b/out/silver does not "exist"), so
  the files under it are listed and deleted one by one.
  """
  path = path.rstrip('/')
  files = [m.path for m in
           FileSystems.match([path + '/**'])[0].metadata_list]
  if files:
    FileSystems.delete(files)
  if FileSystems.exists(path):
    FileSystems.delete([path])


def write_json(path: str, value):
  with FileSystems.create(path) as f:
    f.write(json.dumps(value, indent=2, sort_keys=True).encode('utf-8'))


def read_json(path: str):
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode('utf-8'))


def write_bytes(path: str, data: bytes):
  with FileSystems.create(path) as f:
    f.write(data)


def read_bytes(path: str) -> bytes:
  with FileSystems.open(path) as f:
    return f.read()


class WriteJsonLines(beam.PTransform):
  """PCollection[dict] -> JSON lines files `<prefix>-SSSSS-of-NNNNN.jsonl`."""

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def expand(self, rows):
    return (rows
            | 'ToJson' >> beam.Map(json.dumps, sort_keys=True)
            | 'WriteLines' >> beam.io.WriteToText(
                self._prefix, file_name_suffix='.jsonl'))


class WriteParquetRows(beam.PTransform):
  """PCollection[dict] -> Parquet files `<prefix>-SSSSS-of-NNNNN.parquet`.

  Rows are gathered into Arrow tables first: WriteToParquet on single rows
  spends most of its time converting them one by one.
  """

  def __init__(self, prefix: str, schema):
    super().__init__()
    self._prefix, self._schema = prefix, schema

  def expand(self, rows):
    schema = self._schema
    return (rows
            | 'BatchRows' >> beam.BatchElements(min_batch_size=1000,
                                                max_batch_size=20000)
            | 'ToTable' >> beam.Map(
                lambda batch: pa.Table.from_pylist(batch, schema=schema))
            | 'WriteParquet' >> beam.io.WriteToParquetBatched(
                self._prefix, schema, file_name_suffix='.parquet'))
