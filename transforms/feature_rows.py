"""Reading the feature ("gold") table back: the Parquet files a batch run
wrote under features/, as RecordBatches of the declaration's batch schema.
Read by the model stages (transform, predict) and the online store's
materialisation."""

import apache_beam as beam
import pyarrow as pa

from transforms import arrow
from transforms.common import table_to_batch


def _feature_batch(table: pa.Table) -> pa.RecordBatch:
  """A Parquet table -> one RecordBatch, timestamps as int64 epoch us."""
  columns = [arrow.flat_column(c) for c in table.columns]
  return table_to_batch(pa.Table.from_arrays(columns,
                                             names=table.column_names))


class ReadFeatureRows(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch]: feature-table Parquet files as
  RecordBatches of flat columns, timestamps as int64 epoch microseconds
  (`Dataset.batch_schema`), one per Parquet read (row group)."""

  def __init__(self, pattern: str):
    super().__init__()
    self._pattern = pattern

  def expand(self, pbegin):
    return (pbegin
            # validate=False: do not list the files while building the
            # graph (they do not exist yet in a dry run).
            | 'ReadParquet' >> beam.io.ReadFromParquetBatched(
                self._pattern, validate=False)
            | 'ToRecordBatch' >> beam.Map(_feature_batch))
