"""Model monitoring: a run's predictions joined with labels that arrive later
(the command is `pipelines.monitor`).

Predictions: the Parquet files a batch run writes to `predictions/` (a
folder or a glob), from one model version. Labels: files in any input
format the project reads (JSON lines, CSV, Avro, Parquet) holding the id
field, the label field in its declared raw type and, when the dataset has
one, the timestamp (for the per-day trend). Each label row is checked by
the project's parser against the declaration's id, label and timestamp
fields; a row it rejects is counted by kind, not used.

The join is by id, on whole Arrow columns (`pyarrow.compute.index_in`):
the first copy of an id wins on either side and later copies are counted
(`prediction_duplicates`, `label_duplicates`, `label_conflicts` when a
copy's label differs); labels whose id no prediction has and predictions
without a label are counted, never dropped silently.

The model (for its threshold and its eval-split score distribution) is the
one that made the predictions: with --registry, the registry's entry of the
predictions' model_version; with --model_dir, that folder, whose version
must be the predictions'.

`monitor` writes <output_dir>/monitoring/report.json (`report` documents
its keys). Binary tasks only.
"""

from pipelines.base import quiet  # noqa: F401  pylint: disable=unused-import
from pipelines.base.errors import UsageError

import dataclasses
import datetime
import io
from typing import Any, Dict, List, Optional, Tuple

from apache_beam.io.filesystems import FileSystems
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.outputs import files
from pipelines.model import importance
from pipelines.model.registry import Registry, RegistryError
from pipelines.model.training import evaluate
from pipelines.validation.checks import DRIFT_JSON, SKEW_JSON
from schemas.dataset import RECORD_ID, Dataset, load_dataset
from transforms.inference import verify_model_dir
from transforms.parse import BatchValidator
from transforms.read import InputError, check_input, read_batches

MONITORING = 'monitoring'
REPORT_FILE = 'report.json'
LOG_FILE = 'monitor.log'
DAY_MICROS = 86_400 * 1_000_000
# Proportions below this are raised to it in the PSI (an empty bin on
# either side would make it infinite).
PSI_FLOOR = 1e-4
# Base of the logarithm in the Jensen-Shannon distance: 2, so the distance
# lies in [0, 1].
JS_BASE = 2
LABEL, TIME = 'label', 'time'  # columns of read_labels' table


class MonitorError(UsageError, ValueError):
  """Bad flags or inputs (exit 2)."""


# Inputs ---------------------------------------------------------------------
def _files(pattern: str, what: str) -> List[str]:
  """The files of a glob, or the Parquet files of a folder."""
  if not any(c in pattern for c in '*?['):
    pattern = pattern.rstrip('/') + '/*.parquet'
  try:
    paths = sorted(m.path for m in
                   FileSystems.match([pattern])[0].metadata_list)
  except Exception as e:  # pylint: disable=broad-except
    raise MonitorError(f'{what} {pattern} cannot be listed: {e}') from None
  if not paths:
    raise MonitorError(f'{what} matched no files: {pattern}')
  return paths


def read_predictions(pattern: str, id_field: str) -> Tuple[pa.Table, int]:
  """Prediction Parquet files -> (one table of id, score, model_version;
  number of files). One model version only."""
  paths = _files(pattern, '--predictions')
  tables = []
  for path in paths:
    if not path.endswith('.parquet'):
      raise MonitorError(f'--predictions: {path} is not a .parquet file')
    try:
      with FileSystems.open(path) as f:
        table = pq.read_table(io.BytesIO(f.read()))
    except (OSError, pa.ArrowInvalid) as e:
      raise MonitorError(f'--predictions: cannot read {path}: '
                         f'{str(e).splitlines()[0]}') from None
    missing = [c for c in (id_field, 'score', 'model_version')
               if c not in table.column_names]
    if missing:
      raise MonitorError(f'--predictions: {path} has no column '
                         f'{missing[0]} (binary predictions of a batch run '
                         'are expected)')
    tables.append(table.select([id_field, 'score', 'model_version']))
  table = pa.concat_tables(tables, promote=True)
  versions = sorted(v for v in pc.unique(table.column('model_version'))
                    .to_pylist() if v is not None)
  if len(versions) > 1:
    raise MonitorError(f'--predictions hold {len(versions)} model versions '
                       f'({", ".join(versions)}): monitor one at a time')
  if table.column('score').null_count:
    raise MonitorError('--predictions: some rows have no score')
  return table, len(paths)


def label_dataset(dataset: Dataset) -> Dataset:
  """The declaration cut to what a label file holds: the id and the label
  (required), the timestamp and the fields it is composed from
  (optional). Without a declared id, labels name records by `record_id`."""
  fields = {}
  if dataset.has_id:
    fields[dataset.id_field] = dataclasses.replace(
        dataset.fields[dataset.id_field], required=True)
  else:
    fields[RECORD_ID] = dataclasses.replace(
        dataset.fields[RECORD_ID], required=True, derived=False)
  fields[dataset.label_field] = dataclasses.replace(
      dataset.fields[dataset.label_field], required=True)
  ts = dataset.timestamp_field
  if ts:
    field = dataset.fields[ts]
    for source in (field.compose or {}).values():
      if source in dataset.fields:
        fields[source] = dataclasses.replace(dataset.fields[source],
                                             required=False)
    fields[ts] = dataclasses.replace(field, required=False)
  roles = {k: v for k, v in dataset.roles.items()
           if k in ('id', 'timestamp', 'label')}
  return dataclasses.replace(
      dataset, fields=fields, roles=roles, rules=(), histories=(),
      aggregates={}, transform={}, drift={}, freshness={}, min_examples=0,
      side_tables={}, negatives={})


def read_labels(pattern: str, dataset: Dataset,
                input_format: Optional[str] = None
                ) -> Tuple[pa.Table, Dict[str, int], int]:
  """Label files -> (table of id, label (class index), time (epoch us or
  null); rejected rows by kind; number of files)."""
  try:
    paths = check_input(pattern, input_format)
  except InputError as e:
    raise MonitorError(str(e).replace('--input', '--labels')) from None
  cut = label_dataset(dataset)
  validator = BatchValidator(cut)
  ts = dataset.timestamp_field
  parts, rejected = [], {}
  for path in paths:
    for raw in read_batches(path, cut, input_format):
      valid, dead = validator.validate(raw)
      for row in dead:
        kind = row.get('error_kind') or 'malformed'
        rejected[kind] = rejected.get(kind, 0) + 1
      if valid.num_rows:
        parts.append(pa.table({
            'id': valid.column(cut.id_field),
            LABEL: dataset.label_index(valid.column(dataset.label_field)),
            TIME: (valid.column(ts) if ts else
                    pa.nulls(valid.num_rows, pa.int64()))}))
  id_type = cut.batch_schema().field(cut.id_field).type
  table = (pa.concat_tables(parts) if parts else pa.table(
      {'id': pa.array([], id_type), LABEL: pa.array([], pa.int64()),
       TIME: pa.array([], pa.int64())}))
  return table, dict(sorted(rejected.items())), len(paths)


# Join -----------------------------------------------------------------------
def first_copies(ids: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
  """(mask of each id's first row, index of each row's first copy)."""
  first = pc.index_in(ids, value_set=ids).to_numpy(
      zero_copy_only=False).astype(np.int64)
  return first == np.arange(len(ids)), first


def join(predictions: pa.Table, labels: pa.Table, id_field: str
         ) -> Dict[str, Any]:
  """Predictions (id_field, score) and labels (id, label, time) -> the
  joined rows (label, score, time: NumPy, in label order), every
  prediction's score and the counts."""
  pred_ids = predictions.column(id_field).combine_chunks()
  pred_first, _ = first_copies(pred_ids)
  scores = predictions.column('score').to_numpy().astype(np.float64)
  pred_ids = pred_ids.filter(pa.array(pred_first))
  scores = scores[pred_first]

  label_ids = labels.column('id').combine_chunks()
  if label_ids.type != pred_ids.type:
    try:
      label_ids = label_ids.cast(pred_ids.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      raise MonitorError(f'label ids ({label_ids.type}) and prediction ids '
                         f'({pred_ids.type}) have different types') from None
  values = labels.column(LABEL).to_numpy().astype(np.int64)
  times = labels.column(TIME).combine_chunks()
  label_first, first_of = first_copies(label_ids)
  conflicts = int(np.sum(~label_first & (values != values[first_of])))
  keep = pa.array(label_first)
  label_ids, times = label_ids.filter(keep), times.filter(keep)
  values = values[label_first]

  where = pc.index_in(label_ids, value_set=pred_ids)
  found = np.asarray(where.is_valid().to_numpy(zero_copy_only=False), bool)
  rows = where.filter(pa.array(found)).to_numpy().astype(np.int64)
  matched_times = times.filter(pa.array(found))
  return {
      'labels': values[found], 'scores': scores[rows],
      'times': (matched_times.to_numpy(zero_copy_only=False)
                if matched_times.null_count == 0 else
                np.asarray(matched_times.to_pylist(), dtype=object)),
      'undated': int(matched_times.null_count),
      'all_scores': scores,
      'counts': {
          'predictions_read': predictions.num_rows,
          'prediction_duplicates': predictions.num_rows - len(pred_ids),
          'predictions': len(pred_ids),
          'labels_read': labels.num_rows,
          'label_duplicates': labels.num_rows - len(label_ids),
          'label_conflicts': conflicts,
          'labels': len(label_ids),
          'matched': int(found.sum()),
          'labels_without_prediction': int((~found).sum()),
          'predictions_without_label': len(pred_ids) - int(found.sum()),
      },
  }


# Metrics --------------------------------------------------------------------
def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float
            ) -> Dict[str, Any]:
  """pipelines.model.training.evaluate (scikit-learn's ROC AUC, average precision,
  precision, recall, Brier score, 10 equal-width reliability bins) plus
  the confusion matrix at `threshold`."""
  from sklearn.metrics import confusion_matrix
  out = evaluate(labels, scores, threshold)
  predicted = (scores >= threshold).astype(np.int64)
  tn, fp, fn, tp = confusion_matrix(labels, predicted,
                                    labels=[0, 1]).ravel().tolist()
  out['confusion_matrix'] = {'tn': tn, 'fp': fp, 'fn': fn, 'tp': tp}
  out['threshold'] = threshold
  return out


def _date(day: int) -> str:
  return (datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
          ).isoformat()


def daily_trend(labels: np.ndarray, scores: np.ndarray, times: np.ndarray
                ) -> List[Dict[str, Any]]:
  """Per UTC day of `times` (epoch us): rows, positives, ROC AUC (None
  unless both classes occur that day) and mean score."""
  from sklearn.metrics import roc_auc_score
  days, index = np.unique(np.floor_divide(times.astype(np.int64),
                                          DAY_MICROS), return_inverse=True)
  rows = np.bincount(index, minlength=len(days))
  positives = np.bincount(index, weights=labels, minlength=len(days))
  score_sums = np.bincount(index, weights=scores, minlength=len(days))
  out = []
  for i, day in enumerate(days):
    chosen = index == i
    both = 0 < positives[i] < rows[i]
    out.append({
        'date': _date(int(day)), 'rows': int(rows[i]),
        'positives': int(positives[i]),
        'roc_auc': float(roc_auc_score(labels[chosen], scores[chosen]))
                   if both else None,
        'mean_score': float(score_sums[i] / rows[i])})
  return out


def score_drift(scores: np.ndarray, reference: Optional[Dict[str, Any]]
                ) -> Optional[Dict[str, Any]]:
  """The scores' histogram over the reference's bins, compared with it:
  Jensen-Shannon distance (scipy, base 2: 0 = same, 1 = disjoint) and the
  population stability index sum((p - q) ln(p / q)) of the proportions,
  each raised to PSI_FLOOR first (p: now, q: reference)."""
  if not reference or not len(scores):
    return None
  from scipy.spatial.distance import jensenshannon
  edges = np.asarray(reference['edges'], np.float64)
  expected = np.asarray(reference['counts'], np.float64)
  counts, _ = np.histogram(scores, bins=edges)
  p = np.maximum(counts / counts.sum(), PSI_FLOOR)
  q = np.maximum(expected / expected.sum(), PSI_FLOOR)
  return {
      'rows': int(len(scores)),
      'bins': len(counts),
      'edges': edges.tolist(),
      'reference_counts': expected.astype(np.int64).tolist(),
      'counts': counts.tolist(),
      'js_distance': float(jensenshannon(counts, expected, base=JS_BASE)),
      'js_base': JS_BASE,
      'psi': float(np.sum((p - q) * np.log(p / q))),
      'psi_floor': PSI_FLOOR,
  }


_COMPARED = ('roc_auc', 'pr_auc', 'precision', 'recall', 'brier')


def report(predictions: pa.Table, labels: pa.Table, metadata: Dict[str, Any],
           dataset: Dataset) -> Dict[str, Any]:
  """The monitoring report of predictions and labels (see `join`):

    model        version, dir, threshold, task
    counts       rows read, duplicates, matched and unmatched on each side
    metrics      on the matched rows: rows, positives, roc_auc, pr_auc,
                 precision and recall at the threshold, brier,
                 confusion_matrix {tn, fp, fn, tp}, threshold (null when
                 nothing matched)
    calibration  10 equal-width score bins: lower, upper, count,
                 mean_score, positive_rate
    eval_metrics the model's metrics on its eval split; `change`: now - eval
    trend        {by, days: [{date, rows, positives, roc_auc, mean_score}],
                  rows_without_time}, null without a timestamp
    score_drift  every prediction's score against the model's
                 eval_score_distribution (`score_drift`)
  (`monitor` adds important_features: the model's most important
  features with the drift and skew measured beside the report,
  pipelines.model.importance.important_drift.)
  """
  threshold = float(metadata['threshold'])
  joined = join(predictions, labels, metadata.get('id_field') or
                dataset.id_field)
  y, s = joined['labels'], joined['scores']
  measured = metrics(y, s, threshold) if len(y) else None
  calibration = measured.pop('reliability') if measured else None
  eval_metrics = metadata.get('metrics', {}).get('eval', {})
  change = {k: (measured[k] - eval_metrics[k]
                if measured and measured.get(k) is not None and
                eval_metrics.get(k) is not None else None)
            for k in _COMPARED}
  trend = None
  if dataset.timestamp_field:
    dated = (np.flatnonzero([t is not None for t in joined['times']])
             if joined['undated'] else np.arange(len(y)))
    trend = {'by': f'UTC day of {dataset.timestamp_field} (labels)',
             'days': daily_trend(y[dated], s[dated],
                                 joined['times'][dated].astype(np.int64)),
             'rows_without_time': joined['undated']}
  return {
      'model': {'version': metadata['model_version'],
                'task': metadata.get('task', 'binary'),
                'threshold': threshold},
      'counts': dict(joined['counts'],
                     positives=int(y.sum()) if len(y) else 0),
      'metrics': measured,
      'calibration': calibration,
      'eval_metrics': {k: eval_metrics.get(k) for k in _COMPARED},
      'change': change,
      'trend': trend,
      'score_drift': score_drift(joined['all_scores'],
                                 metadata.get('eval_score_distribution')),
  }


# Model ----------------------------------------------------------------------
def model_of(version: Optional[str], registry: Optional[str],
             model_dir: Optional[str]) -> Tuple[Dict[str, Any], str]:
  """(verified metadata, model dir) of the model that made predictions of
  `version`: the registry's entry of that version, or --model_dir."""
  if registry:
    try:
      model_dir = (Registry(registry).model_dir(version) if version else
                   Registry(registry).champion_dir())
    except RegistryError as e:
      raise MonitorError(f'--registry: {e}') from None
  metadata = verify_model_dir(model_dir)
  if version and metadata['model_version'] != version:
    raise MonitorError(f'the predictions come from model {version}, '
                       f'{model_dir} is {metadata["model_version"]}')
  return metadata, model_dir


def monitor(*, predictions: str, labels: str, output_dir: str,
            schema: str = 'transactions', registry: Optional[str] = None,
            model_dir: Optional[str] = None,
            labels_format: Optional[str] = None) -> Dict[str, Any]:
  """The report of `predictions` (a folder or glob of prediction Parquet
  files) and `labels` (a glob of label files), with the model from
  `registry` or `model_dir`, written to <output_dir>/monitoring/; returns
  it with its `path`."""
  dataset = load_dataset(schema)
  if dataset.task != 'binary':
    raise MonitorError(f'{dataset.name}: monitoring supports binary labels; '
                       f'this label is {dataset.task}')
  id_field = dataset.id_field
  predicted, prediction_files = read_predictions(predictions, id_field)
  versions = pc.unique(predicted.column('model_version')).to_pylist()
  metadata, model_dir = model_of(versions[0] if versions else None,
                                 registry, model_dir)
  if metadata.get('task', 'binary') != 'binary':
    raise MonitorError(f'model {metadata["model_version"]} is '
                       f'{metadata["task"]}: monitoring supports binary')
  label_rows, rejected, label_files = read_labels(labels, dataset,
                                                  labels_format)
  out = report(predicted, label_rows, metadata, dataset)
  out['model']['dir'] = model_dir
  out['counts']['labels_rejected'] = sum(rejected.values())
  out['counts']['labels_rejected_by_kind'] = rejected
  # The model's most important features, with the run's drift and skew
  # (the scoring run's validation/ when the report goes beside it).
  validation_dir = files.join(output_dir, 'validation')
  out['important_features'] = importance.important_drift(
      metadata.get('importance'),
      {kind: files.read_json(path) if FileSystems.exists(path) else None
       for kind, path in (('drift', files.join(validation_dir, DRIFT_JSON)),
                          ('skew', files.join(validation_dir, SKEW_JSON)))})
  out['inputs'] = {'predictions': predictions,
                   'prediction_files': prediction_files,
                   'labels': labels, 'label_files': label_files}
  path = files.join(output_dir, MONITORING, REPORT_FILE)
  files.write_json(path, out)
  out['path'] = path
  return out
