"""The model half of the batch flow: transform, train, predict.

Each Beam stage has a `build_*` function (graph only, for tests and dry
runs) and a runner function; training runs on the driver between them.
"""

from typing import Dict, Optional

import apache_beam as beam
import pyarrow as pa

from pipelines.outputs import files
from pipelines.model.training import (data_version, eval_importance,
                                      read_transformed, train)
from schemas.dataset import Dataset
from transforms import arrow, inference, preprocess
from transforms.common import CountRows
from transforms.feature_rows import ReadFeatureRows
from transforms.inference import ScoreBatches
from transforms.sinks import WriteJsonLines, WriteParquet

TRANSFORM, TRANSFORM_FN, TRANSFORMED, MODEL, PREDICTIONS, CANDIDATES = (
    'transform', 'transform/transform_fn', 'transform/transformed', 'model',
    'predictions', 'model_candidates')


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
          dataset, files.join(output_dir, TRANSFORM_FN)))
  transformed | 'WriteTransformed' >> WriteParquet(
      files.join(output_dir, TRANSFORMED, 'part'),
      preprocess.transformed_arrow_schema(dataset))
  return transformed


def build_score(p: beam.Pipeline, dataset: Dataset, features_glob: str,
                model_dir: str, output_dir: str,
                scored_at: Optional[str] = None, mark_splits: bool = False):
  """Features -> predictions (JSON lines and Parquet); returns the
  PCollection[pa.RecordBatch] of predictions. `mark_splits`: the model
  was trained on these feature rows (in this run), so each prediction's
  `split` is train, eval or scored (`ScoreBatches`)."""
  predictions = (
      p
      | 'ReadFeatures' >> ReadFeatureRows(features_glob)
      | 'CountScored' >> beam.ParDo(CountRows('feature_rows_scored'))
      | 'Score' >> ScoreBatches(model_dir, id_field=dataset.id_field,
                                scored_at=scored_at,
                                max_batch_size=32768,
                                mark_splits=mark_splits)
      | 'CountPredictions' >> beam.ParDo(CountRows('predictions_written')))
  prefix = files.join(output_dir, PREDICTIONS, 'predictions')
  predictions | 'WriteJson' >> WriteJsonLines(prefix)
  predictions | 'WriteParquet' >> WriteParquet(prefix,
                                               dataset.prediction_schema())
  return predictions


# The eval metric that picks the best of several model types, per task,
# and whether higher is better.
SELECTION_METRIC = {'binary': ('roc_auc', True),
                    'multiclass': ('log_loss', False),
                    'regression': ('rmse', False)}


# `--model_type auto` (the default): every model type that fits the task.
AUTO = 'auto'
AUTO_TYPES = {'binary': ('gbt', 'logreg'), 'multiclass': ('gbt', 'logreg'),
              'regression': ('gbt', 'linear')}


def model_types(text: str, task: Optional[str] = None):
  """'gbt,logreg' -> ['gbt', 'logreg']; 'auto' -> the types that fit
  `task` (AUTO_TYPES; none without a task). ValueError on an unknown
  type."""
  from pipelines.model.training import MODELS
  if text.strip() == AUTO:
    return list(AUTO_TYPES.get(task, ()))
  kinds = [k.strip() for k in text.split(',') if k.strip()]
  unknown = [k for k in kinds if k not in MODELS]
  if not kinds or unknown or len(set(kinds)) != len(kinds):
    raise ValueError(f'--model_type {text!r}: auto, or one or more of '
                     f'{", ".join(MODELS)}, comma-separated, each once')
  return kinds


def train_stage(dataset: Dataset, output_dir: str, model_type: str,
                statistics_path: Optional[str]) -> Dict[str, object]:
  """Trains each model type of `model_type` ('gbt', 'gbt,logreg', or
  'auto': those that fit the task) on the same transformed rows and split; the best by the task's eval metric
  (SELECTION_METRIC) becomes model/, with the others' eval metrics beside
  it in its metadata ('compared'). Only the chosen one gets a permutation
  importance (the others' `importance` is None): it is the dearest part
  of training, and nothing reads a candidate's. Returns the chosen
  model's metadata."""
  table = read_transformed(files.join(output_dir, TRANSFORMED))
  features = read_transformed(files.join(output_dir, 'features'))
  model_dir = files.join(output_dir, MODEL)
  files.clear(model_dir)
  kinds = model_types(model_type, dataset.task)
  if len(kinds) == 1:
    return train(table, transform_dir=files.join(output_dir, TRANSFORM_FN),
                 model_dir=model_dir, dataset=dataset, model=kinds[0],
                 statistics_path=statistics_path,
                 data_key=data_version(features, dataset, kinds[0]))
  candidates = {}
  for kind in kinds:
    folder = files.join(output_dir, CANDIDATES, kind)
    files.clear(folder)
    candidates[kind] = (folder, train(
        table, transform_dir=files.join(output_dir, TRANSFORM_FN),
        model_dir=folder, dataset=dataset, model=kind,
        statistics_path=statistics_path,
        data_key=data_version(features, dataset, kind),
        with_importance=False))
  metric, higher = SELECTION_METRIC[dataset.task]

  def quality(kind):
    value = candidates[kind][1]['metrics']['eval'].get(metric)
    if value is None:
      return float('-inf')
    return value if higher else -value
  best = max(kinds, key=lambda k: (quality(k), -kinds.index(k)))
  folder, metadata = candidates[best]
  for rel, path in inference.list_files(folder).items():
    files.write_bytes(inference.join_path(model_dir, rel), files.read_bytes(path))
  metadata['importance'] = eval_importance(
      table, folder, dataset, metadata['training']['eval_fraction'])
  metadata['compared'] = {
      'metric': metric, 'chosen': best,
      'eval': {kind: {k: v for k, v in meta['metrics']['eval'].items()
                      if not isinstance(v, (list, dict))}
               for kind, (_, meta) in candidates.items()}}
  # metadata.json is outside the files' digests; it is signed again (with
  # $MLPIPE_MODEL_KEY) since the importance and comparison are part of it.
  return inference.write_metadata(model_dir, metadata)
