"""The model half of the batch flow: transform, train, predict.

Each Beam stage has a `build_*` function (graph only, for tests and dry
runs) and a runner function; training runs on the driver between them.
"""

from typing import Dict, Optional

import apache_beam as beam
import pyarrow as pa

from pipelines import io
from pipelines.train import data_version, read_transformed, train
from schemas.dataset import Dataset
from transforms import arrow, preprocess
from transforms.common import CountRows, table_to_batch
from transforms.inference import ScoreBatches
from transforms.sinks import WriteJsonLines, WriteParquet

TRANSFORM, TRANSFORM_FN, TRANSFORMED, MODEL, PREDICTIONS = (
    'transform', 'transform/transform_fn', 'transform/transformed', 'model',
    'predictions')


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


def build_transform(p: beam.Pipeline, dataset: Dataset, features_glob: str,
                    output_dir: str, label_learned: bool = False):
  """Features -> transform graph + transformed batches (Parquet).
  `label_learned`: the rows' label is already the class index (training
  examples), else it is mapped here."""
  rows = p | 'ReadFeatures' >> ReadFeatureRows(features_glob)
  if not label_learned:
    rows = rows | 'LabelAsLearned' >> beam.Map(preprocess.with_label_index,
                                                dataset)
  transformed = (
      rows
      | 'ToTFXIOBatches' >> arrow.ToTFXIOBatches(
          preprocess.input_types(dataset))
      | 'AnalyzeAndTransform' >> preprocess.AnalyzeAndTransform(
          dataset, io.join(output_dir, TRANSFORM_FN)))
  transformed | 'WriteTransformed' >> WriteParquet(
      io.join(output_dir, TRANSFORMED, 'part'),
      preprocess.transformed_arrow_schema(dataset))
  return transformed


def build_score(p: beam.Pipeline, dataset: Dataset, features_glob: str,
                model_dir: str, output_dir: str,
                scored_at: Optional[str] = None):
  """Features -> predictions (JSON lines and Parquet); returns the
  PCollection[pa.RecordBatch] of predictions."""
  predictions = (
      p
      | 'ReadFeatures' >> ReadFeatureRows(features_glob)
      | 'CountScored' >> beam.ParDo(CountRows('feature_rows_scored'))
      | 'Score' >> ScoreBatches(model_dir, id_field=dataset.id_field,
                                scored_at=scored_at,
                                max_batch_size=32768)
      | 'CountPredictions' >> beam.ParDo(CountRows('predictions_written')))
  prefix = io.join(output_dir, PREDICTIONS, 'predictions')
  predictions | 'WriteJson' >> WriteJsonLines(prefix)
  predictions | 'WriteParquet' >> WriteParquet(prefix,
                                               dataset.prediction_schema())
  return predictions


def train_stage(dataset: Dataset, output_dir: str, model_type: str,
                statistics_path: Optional[str]) -> Dict[str, object]:
  """Trains on the transformed rows; returns the model's metadata."""
  table = read_transformed(io.join(output_dir, TRANSFORMED))
  features = read_transformed(io.join(output_dir, 'features'))
  model_dir = io.join(output_dir, MODEL)
  io.clear(model_dir)
  return train(table, transform_dir=io.join(output_dir, TRANSFORM_FN),
               model_dir=model_dir, dataset=dataset, model=model_type,
               statistics_path=statistics_path,
               model_version=data_version(features, dataset, model_type))
