"""Trains a scikit-learn model on tf.Transform output, for the label's task
(the command is `pipelines.train`; the batch job calls `train` through
`pipelines.model.stages`).

Input: transformed rows (columns of
`transforms.preprocess.transformed_arrow_schema`), e.g. the Parquet files the
batch pipeline writes to `transformed/`. Rows without a label are dropped.

Split by time: rows sorted by (event time, id); the earliest
1 - eval_fraction (default 80%) train the model, the latest 20% evaluate it.
A dataset without a timestamp is split at random instead, stratified by
class and seeded (`stratified_split`); the metadata says which split.

Tasks (the label's declaration): binary (ROC/PR AUC, precision and recall
at the threshold, Brier, reliability), multiclass (macro one-vs-rest ROC
AUC, log loss, accuracy), regression (RMSE, MAE, R2).

Threshold (binary): chosen on the training split only. The model is first fitted on
80% of the training split (the earliest by time, else a seeded stratified
random 80%); the threshold maximising F1 on the remaining 20% of the
training split is kept (`threshold_method` names which); the final model is then
refitted on the whole training split. Evaluation metrics never influence it.

Models (deterministic, random_state=0):
  gbt     HistGradientBoostingClassifier; vocabulary indices are declared
          categorical, quantile buckets stay ordinal.
  logreg  LogisticRegression on one-hot vocabulary and bucket indices plus
          the z-scored numeric columns.

Feature importance (pipelines.model.importance): permutation importance
on the eval split per raw feature, in the metadata's `importance` (of the
kept model only, when several model types compete: `eval_importance`).

Writes model_dir/: model.skops, transform_fn/ (copy of the tft output dir:
transform_fn/ and transformed_metadata/), split.parquet (a hash of each
training and eval row's id, for the predictions' `split` column),
metadata.json (see `train`).
"""

from pipelines.base import quiet  # pylint: disable=unused-import  # noqa: F401
from pipelines.base.errors import UsageError

import datetime
import hashlib
import io
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from apache_beam.io.filesystems import FileSystems
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.model import importance
from schemas.dataset import MISSING_SUFFIX, TRANSFORMED_SUFFIX, load_dataset
from transforms import inference
from transforms import preprocess
from transforms.sinks import conform

MODELS = ('gbt', 'logreg', 'linear')
RANDOM_STATE = 0
RELIABILITY_BINS = 10
SCORE_BINS = 20
# Subdirectories of a tft output dir that make up the transform graph.
_TFT_PARTS = ('transform_fn', 'transformed_metadata')


class TrainingError(UsageError, ValueError):
  """The data cannot train a model (too few rows, one class only)."""


# Input ----------------------------------------------------------------------
def read_transformed(pattern: str) -> pa.Table:
  """Parquet files of transformed rows (a directory or a glob) -> one table."""
  if not any(c in pattern for c in '*?['):
    pattern = pattern.rstrip('/') + '/**'
  paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list
                 if m.path.endswith('.parquet'))
  if not paths:
    raise TrainingError(f'no .parquet files match {pattern}')
  tables = []
  for path in paths:
    with FileSystems.open(path) as f:
      tables.append(pq.read_table(io.BytesIO(f.read())))
  return pa.concat_tables(tables, promote=True)


def _as_table(transformed: Union[pa.Table, pa.RecordBatch,
                                 Iterable[pa.RecordBatch], Iterable[dict]],
              dataset) -> pa.Table:
  """A table, RecordBatches (AnalyzeAndTransform's output) or rows -> one
  table of `transformed_arrow_schema(dataset)`'s columns (a table as is)."""
  if isinstance(transformed, pa.Table):
    return transformed
  schema = preprocess.transformed_arrow_schema(dataset)
  if isinstance(transformed, pa.RecordBatch):
    transformed = [transformed]
  items = list(transformed)
  if items and all(isinstance(i, pa.RecordBatch) for i in items):
    return pa.concat_tables([conform(b, schema) for b in items])
  return pa.Table.from_pylist(items, schema=schema)


def time_split(table: pa.Table, timestamp_field: str, id_field: str,
               eval_fraction: float = 0.2):
  """Sorted by (time, id) -> (earlier rows, later rows); eval is the later."""
  table = table.sort_by([(timestamp_field, 'ascending'),
                         (id_field, 'ascending')])
  n_eval = int(round(table.num_rows * eval_fraction))
  n_train = table.num_rows - n_eval
  return table.slice(0, n_train), table.slice(n_train)


def stratified_split(table: pa.Table, id_field: str, label_field: str,
                     eval_fraction: float = 0.2, seed: int = RANDOM_STATE,
                     stratify: bool = True):
  """(train rows, eval rows) for rows with no time order: within each
  class (all rows for regression, stratify=False), the rows are ordered by
  a seeded hash of their id and the last eval_fraction go to eval. The
  split depends on the ids and the seed only, not on the row order."""
  import pandas as pd
  ids = table.column(id_field).to_numpy()
  key = pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False,
                           hash_key=f'mlpipe-split{seed:04d}'[:16])
  strata = (table.column(label_field).to_numpy()
            if stratify else np.zeros(table.num_rows))
  eval_rows = np.zeros(table.num_rows, bool)
  for stratum in np.unique(strata):
    rows = np.flatnonzero(strata == stratum)
    rows = rows[np.lexsort((ids[rows].astype(str), key[rows]))]
    n_eval = int(round(len(rows) * eval_fraction))
    eval_rows[rows[len(rows) - n_eval:]] = True
  ordered = lambda t: t.sort_by([(id_field, 'ascending')])
  return (ordered(table.filter(pa.array(~eval_rows))),
          ordered(table.filter(pa.array(eval_rows))))


def split(table: pa.Table, dataset, eval_fraction: float):
  """The dataset's train/eval split: by time when it has a timestamp, else
  seeded stratified random (`stratified_split`)."""
  if dataset.timestamp_field:
    return time_split(table, dataset.timestamp_field, dataset.id_field,
                      eval_fraction)
  return stratified_split(table, dataset.id_field, dataset.label_field,
                          eval_fraction,
                          stratify=dataset.task != 'regression')


def split_name(dataset) -> str:
  if dataset.timestamp_field:
    return 'time: the latest rows evaluate'
  return (f'stratified random by class, seed {RANDOM_STATE}'
          if dataset.task != 'regression' else
          f'random, seed {RANDOM_STATE}')


def threshold_method(dataset) -> str:
  """How the binary threshold is chosen, named by the split that holds
  its rows out: the latest fifth of the training split by time, or a
  seeded stratified fifth of it without a timestamp."""
  if dataset.timestamp_field:
    return 'max_f1_on_latest_20pct_of_train'
  return f'max_f1_on_stratified_random_20pct_of_train_seed_{RANDOM_STATE}'


# Models and metrics ---------------------------------------------------------
def make_estimator(kind: str, features: Sequence[str],
                   categorical: Sequence[str], ordinal_discrete: Sequence[str],
                   task: str = 'binary'):
  """An unfitted estimator; `categorical`/`ordinal_discrete` name columns.
  gbt is a histogram gradient-boosted classifier or regressor; logreg a
  logistic regression (classification); linear a ridge regression
  (regression); both linear models one-hot the discrete columns."""
  regression = task == 'regression'
  if kind not in MODELS:
    raise ValueError(f'unknown model {kind!r}; use one of '
                     f'{", ".join(MODELS)}')
  if kind == 'logreg' and regression:
    raise TrainingError('--model_type logreg is a classifier and the label '
                        'is a regression target: use gbt or linear')
  if kind == 'linear' and not regression:
    raise TrainingError('--model_type linear is for regression: use gbt or '
                        'logreg for a class label')
  if kind == 'gbt':
    from sklearn.ensemble import (HistGradientBoostingClassifier,
                                  HistGradientBoostingRegressor)
    mask = [f in set(categorical) for f in features]
    model = (HistGradientBoostingRegressor if regression else
             HistGradientBoostingClassifier)
    return model(categorical_features=mask if any(mask) else None,
                 random_state=RANDOM_STATE)
  from sklearn.compose import ColumnTransformer
  from sklearn.linear_model import LogisticRegression, Ridge
  from sklearn.pipeline import Pipeline
  from sklearn.preprocessing import OneHotEncoder
  discrete = set(categorical) | set(ordinal_discrete)
  columns = [i for i, f in enumerate(features) if f in discrete]
  encode = ColumnTransformer(
      [('onehot', OneHotEncoder(handle_unknown='ignore'), columns)],
      remainder='passthrough')
  model = (Ridge(alpha=1.0) if regression else
           LogisticRegression(max_iter=1000, random_state=RANDOM_STATE))
  return Pipeline([('encode', encode), ('model', model)])


def max_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> Dict[str, Any]:
  """The score threshold with the highest F1 (predict 1 when score >= it)."""
  from sklearn.metrics import precision_recall_curve
  precision, recall, thresholds = precision_recall_curve(labels, scores)
  # The last precision/recall pair has no threshold.
  p, r = precision[:-1], recall[:-1]
  f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
  best = int(np.argmax(f1))
  return {'threshold': float(thresholds[best]), 'f1': float(f1[best]),
          'precision': float(p[best]), 'recall': float(r[best])}


def reliability_bins(labels: np.ndarray, scores: np.ndarray,
                     bins: int = RELIABILITY_BINS) -> List[Dict[str, Any]]:
  """Equal-width score bins: count, mean score and observed positive rate."""
  index = np.minimum((scores * bins).astype(int), bins - 1)
  out = []
  for b in range(bins):
    chosen = index == b
    count = int(chosen.sum())
    out.append({'lower': b / bins, 'upper': (b + 1) / bins, 'count': count,
                'mean_score': float(scores[chosen].mean()) if count else None,
                'positive_rate': float(labels[chosen].mean()) if count
                                 else None})
  return out


def evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float
             ) -> Dict[str, Any]:
  """ROC AUC, PR AUC, precision/recall at threshold, Brier, reliability."""
  from sklearn.metrics import (average_precision_score, brier_score_loss,
                               precision_score, recall_score, roc_auc_score)
  predicted = (scores >= threshold).astype(int)
  both = len(np.unique(labels)) == 2
  return {
      'rows': int(len(labels)), 'positives': int(labels.sum()),
      # Undefined (None) when the split holds a single class.
      'roc_auc': float(roc_auc_score(labels, scores)) if both else None,
      'pr_auc': float(average_precision_score(labels, scores)) if both
                else None,
      'precision': float(precision_score(labels, predicted, zero_division=0)),
      'recall': float(recall_score(labels, predicted, zero_division=0)),
      'brier': float(brier_score_loss(labels, scores)),
      'reliability': reliability_bins(labels, scores),
  }


def evaluate_multiclass(labels: np.ndarray, proba: np.ndarray,
                        classes: np.ndarray, n_classes: int
                        ) -> Dict[str, Any]:
  """Macro one-vs-rest ROC AUC, log loss and accuracy; `proba` has a
  column per class of `classes` (the classes the model saw)."""
  from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
  full = np.zeros((len(labels), n_classes))
  full[:, classes] = proba
  present = np.unique(labels)
  auc = None
  if len(present) == n_classes:
    auc = float(roc_auc_score(labels, full, multi_class='ovr',
                              average='macro', labels=list(range(n_classes))))
  return {
      'rows': int(len(labels)),
      'roc_auc': auc,   # macro one-vs-rest; None unless every class occurs
      'log_loss': float(log_loss(labels, full,
                                 labels=list(range(n_classes)))),
      'accuracy': float(accuracy_score(labels, classes[np.argmax(proba, 1)])),
      'class_counts': {int(c): int((labels == c).sum()) for c in present},
  }


def evaluate_regression(targets: np.ndarray, predictions: np.ndarray
                        ) -> Dict[str, Any]:
  """RMSE, MAE and R2 (scikit-learn's definitions)."""
  from sklearn.metrics import (mean_absolute_error, mean_squared_error,
                               r2_score)
  return {
      'rows': int(len(targets)),
      'rmse': float(np.sqrt(mean_squared_error(targets, predictions))),
      'mae': float(mean_absolute_error(targets, predictions)),
      'r2': float(r2_score(targets, predictions)) if len(targets) > 1
            else None,
  }


def _iso(epoch_us: int) -> str:
  return datetime.datetime.fromtimestamp(
      epoch_us / 1e6, tz=datetime.timezone.utc).isoformat()


def _time_range(table: pa.Table, field: str) -> Dict[str, Any]:
  """Event time range (epoch us and RFC 3339) of a split."""
  values = table.column(field).to_numpy()
  lo, hi = int(values.min()), int(values.max())
  return {'min_us': lo, 'max_us': hi, 'min': _iso(lo), 'max': _iso(hi)}


def _labels(table: pa.Table, field: str, task: str = 'binary'
            ) -> np.ndarray:
  values = table.column(field).to_numpy()
  return values.astype(np.float64 if task == 'regression' else np.int64)


# Model directory ------------------------------------------------------------
def _write_bytes(path: str, data: bytes):
  with FileSystems.create(path) as f:
    f.write(data)


def _copy_transform(transform_dir: str, model_dir: str):
  """Copies the graph parts of a tft output dir to model_dir/transform_fn/."""
  files = inference.list_files(transform_dir)
  parts = {rel: path for rel, path in files.items()
           if rel.split('/')[0] in _TFT_PARTS}
  if not any(rel.startswith('transform_fn/') for rel in parts):
    raise TrainingError(f'{transform_dir} holds no transform_fn/')
  for rel, path in parts.items():
    with FileSystems.open(path) as f:
      _write_bytes(inference.join_path(
          model_dir, f'{inference.TRANSFORM_DIR}/{rel}'), f.read())


# Training -------------------------------------------------------------------
def _ipc_bytes(table: pa.Table) -> bytes:
  sink = pa.BufferOutputStream()
  with pa.ipc.new_stream(sink, table.schema) as writer:
    writer.write_table(table)
  return sink.getvalue().to_pybytes()


def _file_sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def data_version(table: pa.Table, dataset, model_type: str) -> str:
  """A key of the training data and settings: the feature rows (sorted by
  id), the declaration and the model type. Half of a model's version
  (`learned_version`); alone it cannot tell two models apart that learned
  different things from the same rows."""
  digest = hashlib.sha256(_ipc_bytes(table.sort_by(dataset.id_field)))
  with open(dataset.path, 'rb') as f:
    digest.update(f.read())
  digest.update(model_type.encode())
  return 'v' + digest.hexdigest()[:16]


def learned_version(data_key: str, estimator_bytes: bytes,
                  transform_dir: str) -> str:
  """The version of a trained model: a hash of the data key
  (`data_version`) and of what was learned, the tf.Transform analyzers'
  outputs (`preprocess.analyzer_digest`: constants such as means and
  quantile boundaries, and the vocabularies) and the fitted estimator
  (`inference.estimator_digest`). Equal rows, settings, analyzer outputs
  and fit give an equal version (a rerun); a change to any of them gives
  another (an approximate analyzer that draws one quantile boundary
  elsewhere on another runner makes another model, and another version).
  The files' own bytes cannot serve: tf.Transform's SavedModel and skops'
  archive name their parts differently on every write."""
  digest = hashlib.sha256(data_key.encode('utf-8'))
  digest.update(preprocess.analyzer_digest(transform_dir).encode())
  digest.update(inference.estimator_digest(estimator_bytes).encode())
  return 'v' + digest.hexdigest()[:16]


def _labelled(transformed, dataset) -> pa.Table:
  """The rows `train` learns from: a table of the transformed columns
  (`_as_table`) without the unlabelled rows."""
  table = _as_table(transformed, dataset)
  return table.filter(table.column(dataset.label_field).is_valid())


def _importance(estimator, eval_rows: pa.Table, dataset
                ) -> Optional[Dict[str, Any]]:
  """Permutation importance per raw feature (pipelines.model.importance)
  of a fitted estimator on the eval rows."""
  features = preprocess.transformed_feature_names(dataset)
  task = dataset.task
  return importance.permutation_importance(
      estimator,
      inference.feature_matrix({n: eval_rows.column(n) for n in features},
                               features),
      _labels(eval_rows, dataset.label_field, task),
      importance.raw_groups(features, dataset.model_features(),
                            TRANSFORMED_SUFFIX, MISSING_SUFFIX),
      task, len(dataset.label.class_names) if task != 'regression' else 0)


def eval_importance(transformed, model_dir: str, dataset,
                    eval_fraction: float = 0.2) -> Optional[Dict[str, Any]]:
  """The metadata's `importance` of the model in `model_dir` that `train`
  fitted on `transformed` (same rows, same `eval_fraction`) with
  with_importance=False: the same eval split again (`split` depends on
  the rows only), the estimator read back from its file."""
  table = _labelled(transformed, dataset)
  _, eval_rows = split(table, dataset, eval_fraction)
  path = inference.join_path(model_dir, inference.MODEL_FILE)
  with FileSystems.open(path) as f:
    estimator = inference.loads_estimator(f.read(), path)
  return _importance(estimator, eval_rows, dataset)


def train(transformed: Union[pa.Table, Iterable[pa.RecordBatch],
                            Iterable[dict]], *, transform_dir: str,
          model_dir: str, dataset=None, model: str = 'gbt',
          eval_fraction: float = 0.2, statistics_path: Optional[str] = None,
          model_version: Optional[str] = None,
          data_key: Optional[str] = None,
          with_importance: bool = True) -> Dict[str, Any]:
  """Trains, evaluates and writes a model directory; returns its metadata.

  transformed: a table, RecordBatches or rows with the columns of
    `preprocess.transformed_arrow_schema(dataset)`; unlabelled rows dropped.
  model_version: recorded as given (e.g. a run timestamp from the caller);
    by default `learned_version` of `data_key` (the caller's
    `data_version` of the feature rows; by default that of the
    transformed rows) and of what was learned, so equal data, settings,
    analyzer outputs and fit give an equal version and no clock is read.
  with_importance: False leaves the metadata's `importance` None (the
    candidates of `--model_type auto`: only the kept one gets it, from
    `eval_importance`, as permuting every feature costs more than a fit).
  """
  dataset = dataset or load_dataset()
  if model not in MODELS:
    raise ValueError(f'unknown model {model!r}; use one of {", ".join(MODELS)}')
  if inference.list_files(model_dir):
    raise TrainingError(f'model_dir {model_dir} is not empty')
  label, ts, id_field = (dataset.label_field, dataset.timestamp_field,
                         dataset.id_field)
  if not label:
    raise TrainingError(f'dataset {dataset.name} declares no label')
  task = dataset.task
  table = _labelled(transformed, dataset)
  features = preprocess.transformed_feature_names(dataset)
  categorical = preprocess.categorical_feature_names(dataset)
  buckets = [preprocess.transformed_name(n)
             for n in dataset.transform.get('bucketize', {})]
  make_estimator(model, features, categorical, buckets, task)  # fail early

  train_rows, eval_rows = split(table, dataset, eval_fraction)
  fit_rows, pick_rows = split(train_rows, dataset, 0.2)
  for name, part in (('train', train_rows), ('eval', eval_rows),
                     ('threshold', pick_rows), ('fit', fit_rows)):
    if part.num_rows == 0:
      raise TrainingError(f'too few labelled rows ({table.num_rows}) for a '
                          f'{name} split')
  if task != 'regression' and len(np.unique(_labels(fit_rows, label))) < 2:
    raise TrainingError('the earliest training rows hold a single class')

  def matrix(rows):
    return inference.feature_matrix(
        {n: rows.column(n) for n in features}, features)

  def fit(rows):
    estimator = make_estimator(model, features, categorical, buckets, task)
    return estimator.fit(matrix(rows), _labels(rows, label, task))

  def scores(estimator, rows):
    return estimator.predict_proba(matrix(rows))[:, 1]

  threshold, selection = None, None
  if task == 'binary':
    # Threshold from the later part of the training split, then refit.
    pick_labels = _labels(pick_rows, label)
    if pick_labels.sum() > 0:
      selection = max_f1_threshold(pick_labels,
                                   scores(fit(fit_rows), pick_rows))
      selection['method'] = threshold_method(dataset)
    else:
      selection = {'threshold': 0.5, 'method': 'default_0.5_no_positives'}
    threshold = selection['threshold']
  estimator = fit(train_rows)

  def metrics_of(rows):
    labels = _labels(rows, label, task)
    if task == 'binary':
      return evaluate(labels, scores(estimator, rows), threshold)
    if task == 'multiclass':
      return evaluate_multiclass(labels, estimator.predict_proba(matrix(rows)),
                                 np.asarray(estimator.classes_),
                                 len(dataset.label.class_names))
    return evaluate_regression(labels, estimator.predict(matrix(rows)))

  metrics = {'train': metrics_of(train_rows), 'eval': metrics_of(eval_rows)}
  # What the model relies on, per raw feature, on the eval split.
  feature_importance = (_importance(estimator, eval_rows, dataset)
                        if with_importance else None)
  score_distribution = None
  if task == 'binary':
    # The eval split's scores, binned: the reference that monitoring
    # compares later scores against (score drift).
    counts, edges = np.histogram(scores(estimator, eval_rows),
                                 bins=SCORE_BINS, range=(0.0, 1.0))
    score_distribution = {'edges': edges.tolist(), 'counts': counts.tolist()}

  estimator_bytes = inference.dumps_estimator(estimator)
  _write_bytes(inference.join_path(model_dir, inference.MODEL_FILE),
               estimator_bytes)
  _copy_transform(transform_dir, model_dir)
  # Which ids trained and which evaluated it: predictions say per row
  # whether the model that made them trained on it (`split`).
  sink = pa.BufferOutputStream()
  pq.write_table(inference.split_table(train_rows.column(id_field),
                                       eval_rows.column(id_field)), sink)
  _write_bytes(inference.join_path(model_dir, inference.SPLIT_FILE),
               sink.getvalue().to_pybytes())
  files = inference.file_digests(model_dir)

  metadata = {
      'model_version': model_version or learned_version(
          data_key or data_version(table, dataset, model), estimator_bytes,
          transform_dir),
      'model_type': model,
      'estimator': type(estimator).__name__,
      'dataset': dataset.name,
      'task': task,
      'data_hash': hashlib.sha256(_ipc_bytes(table.sort_by(id_field))
                                  ).hexdigest(),
      'declaration_hash': _file_sha256(dataset.path),
      'classes': ([str(c) for c in dataset.label.class_names]
                  if task != 'regression' else None),
      'id_field': id_field, 'timestamp_field': ts, 'label_field': label,
      'id_type': dataset.fields[id_field].type,
      'raw_features': preprocess.raw_input_types(dataset),
      'optional_features': preprocess.optional_inputs(dataset),
      'features': features,
      'categorical_features': categorical,
      'threshold': threshold,
      'threshold_selection': selection,
      'eval_score_distribution': score_distribution,
      'risk': dataset.risk or None,
      'metrics': metrics,
      'importance': feature_importance,
      'training': {
          'rows': {'train': train_rows.num_rows, 'eval': eval_rows.num_rows},
          'split': split_name(dataset),
          'train_time_range': _time_range(train_rows, ts) if ts else None,
          'eval_time_range': _time_range(eval_rows, ts) if ts else None,
          'eval_fraction': eval_fraction,
          'random_state': RANDOM_STATE,
      },
      'statistics_path': statistics_path,
      'model_file': inference.MODEL_FILE,
      'split_file': inference.SPLIT_FILE,
      'transform_dir': inference.TRANSFORM_DIR,
      'files': files,
  }
  # Signed with the operator's key when $MLPIPE_MODEL_KEY is set.
  return inference.write_metadata(model_dir, metadata)
