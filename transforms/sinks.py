"""Writing outputs: Parquet and JSON lines from RecordBatches (batch), JSON
lines cut by processing time and Pub/Sub messages from rows (streaming).
"""

import json
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger, window
import pyarrow as pa

from transforms.common import json_row


def conform(batch, schema: pa.Schema) -> pa.Table:
  """A RecordBatch or Table -> Table of `schema`'s columns and types.

  int64 epoch microseconds become the schema's timestamp type; columns
  outside the schema are dropped; a column the schema names but the batch
  lacks is all null.
  """
  table = (batch if isinstance(batch, pa.Table)
           else pa.Table.from_batches([batch]))
  columns = []
  for field in schema:
    if field.name in table.column_names:
      column = table.column(field.name)
      if column.type != field.type:
        column = column.cast(field.type)
    else:
      column = pa.nulls(table.num_rows, type=field.type)
    columns.append(column)
  return pa.Table.from_arrays(columns, schema=schema)


class WriteParquet(beam.PTransform):
  """PCollection[pa.RecordBatch | pa.Table] -> Parquet files
  `<prefix>-SSSSS-of-NNNNN.parquet` of `schema`."""

  def __init__(self, prefix: str, schema: pa.Schema):
    super().__init__()
    self._prefix, self._schema = prefix, schema

  def expand(self, batches):
    schema = self._schema
    return (batches
            | 'ConformToSchema' >> beam.Map(conform, schema)
            | 'WriteParquet' >> beam.io.WriteToParquetBatched(
                self._prefix, schema, file_name_suffix='.parquet'))


def _json_lines(batch) -> str:
  return '\n'.join(json.dumps(row, sort_keys=True)
                   for row in batch.to_pylist())


class WriteJsonLines(beam.PTransform):
  """PCollection[pa.RecordBatch] -> JSON lines files
  `<prefix>-SSSSS-of-NNNNN.jsonl`, one object per row, keys sorted.

  JSON has no columnar writer that prints floats as Python does (the
  shortest repr that reads back exactly), so each batch is turned into
  text row by row here, at the edge, and written as one block.
  """

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def expand(self, batches):
    return (batches
            | 'SkipEmpty' >> beam.Filter(lambda b: b.num_rows > 0)
            | 'ToJsonBlock' >> beam.Map(_json_lines)
            | 'WriteLines' >> beam.io.WriteToText(
                self._prefix, file_name_suffix='.jsonl'))


# Streaming --------------------------------------------------------------------
class _WritePaneFile(beam.DoFn):

  def __init__(self, directory: str, prefix: str):
    self._directory, self._prefix = directory, prefix

  def process(self, element, pane=beam.DoFn.PaneInfoParam):
    _, lines = element
    path = FileSystems.join(self._directory,
                            f'{self._prefix}-{pane.index:06d}.jsonl')
    with FileSystems.create(path) as f:
      for line in sorted(lines):
        f.write(line.encode('utf-8') + b'\n')
    yield path


class WriteJsonLinesPanes(beam.PTransform):
  """PCollection[dict] -> files `<directory>/<prefix>-<pane:06d>.jsonl`;
  returns PCollection[str] of the paths written.

  Rows are cut into files by processing time (every `every` seconds while
  rows arrive) in the global window, and flushed when the stream ends. A
  sink windowed by event time would drop rows behind the watermark (late
  events, late aggregate panes); this one drops nothing. A restarted job
  starts again at pane 0: give it a fresh directory.
  """

  def __init__(self, directory: str, prefix: str, every: int = 60):
    super().__init__()
    self._directory, self._prefix, self._every = directory, prefix, every

  def expand(self, rows):
    return (rows
            | 'CutByProcessingTime' >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.AfterWatermark(
                    early=trigger.AfterProcessingTime(self._every)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | 'ToJson' >> beam.Map(lambda row: (None, json_row(row)))
            | 'OneFilePerPane' >> beam.GroupByKey()
            | 'WriteFile' >> beam.ParDo(
                _WritePaneFile(self._directory, self._prefix)))


class WriteJsonToPubSub(beam.PTransform):
  """PCollection[dict] -> JSON messages on a Pub/Sub topic."""

  def __init__(self, topic: str):
    super().__init__()
    self._topic = topic

  def expand(self, rows):
    return (rows
            | 'ToJsonBytes' >> beam.Map(
                lambda row: json_row(row).encode('utf-8'))
            | 'Publish' >> beam.io.WriteToPubSub(self._topic))
