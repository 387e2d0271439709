"""The session's trained model: tf.Transform (-> Parquet `transformed/`)
on tests/test_train_inference.py's synthetic feature rows, and the default
model (gbt) trained on them once. Shared by test_train_inference.py and
test_flink_kafka.py (imported by conftest.py, so it is built once per
session, not once per module). test_registry.py and
test_training_metrics.py define their own `trained`, which overrides this
one there."""

import apache_beam as beam
import pytest

from pipelines.model import training as train_lib
from transforms import arrow, preprocess
from transforms.sinks import WriteParquet


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """Runs AnalyzeAndTransform (-> Parquet) and trains the gbt model once:
  {root, rows, table, metadata, model_dir, transform_dir}."""
  from tests.test_train_inference import (  # pylint: disable=import-outside-toplevel
      DATASET, synthetic_rows, to_batches)
  root = tmp_path_factory.mktemp('e2e')
  rows = synthetic_rows()
  transform_dir = str(root / 'transform')
  types = preprocess.input_types(DATASET)
  with beam.Pipeline() as p:
    transformed = (p
                   | beam.Create(to_batches(rows, 500))
                   | arrow.ToTFXIOBatches(types, max_rows=300)
                   | preprocess.AnalyzeAndTransform(
                       DATASET, transform_dir, temp_dir=str(root / 'tmp')))
    _ = transformed | WriteParquet(
        str(root / 'transformed' / 'part'),
        preprocess.transformed_arrow_schema(DATASET))
  table = train_lib.read_transformed(str(root / 'transformed'))
  model_dir = str(root / 'model')
  metadata = train_lib.train(table, transform_dir=transform_dir,
                             model_dir=model_dir, dataset=DATASET)
  return {'root': root, 'rows': rows, 'table': table, 'metadata': metadata,
          'model_dir': model_dir, 'transform_dir': transform_dir}
