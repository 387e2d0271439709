"""A run's figures for Prometheus, and its health score.

  write_metrics(summary, path)    <output_dir>/metrics.prom, Prometheus text
                                  exposition (for node-exporter's textfile
                                  collector), through prometheus_client
  health(summary)                 the 0..1 health score and its parts
  serve(port, result)             the streaming job's live endpoint on
                                  127.0.0.1:PORT/metrics

Every metric is named `mlpipe_*`; `families(summary)` lists them. The
values come from the run summary only (no clock): counters of records
read, valid and dead-lettered (by kind), feature and aggregate rows and
predictions; gauges of stage durations, drift and skew distances with
their thresholds, anomalies by severity, the model's eval metrics and the
health score.
"""

import math
import threading
from typing import Any, Dict, Iterable, List, Optional

from apache_beam.io.filesystems import FileSystems
from prometheus_client import CollectorRegistry, exposition
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    InfoMetricFamily)

METRICS_FILE = 'metrics.prom'
PREFIX = 'mlpipe'

# Health score: a weighted mean of the parts a run has, times how far it
# got. The README explains each.
WEIGHTS = {'validity': 0.3, 'anomalies': 0.3, 'drift': 0.2, 'model': 0.2}
ANOMALY_FACTOR = {'ERROR': 0.5, 'WARNING': 0.9, 'INFO': 0.99}
STOPPED_FACTOR = 0.5   # a run the validation gate stopped


def _clip(value: float) -> float:
  return min(1.0, max(0.0, value))


def model_quality(model: Optional[Dict[str, Any]]) -> Optional[float]:
  """0..1 from the eval metrics: (ROC AUC - 0.5) / 0.5 for classes (the
  accuracy when a multiclass AUC is undefined), R2 for regression, both
  clipped to 0..1; None without a model."""
  if not model:
    return None
  metrics = (model.get('metrics') or {}).get('eval') or {}
  if model.get('task') == 'regression':
    r2 = metrics.get('r2')
    return None if r2 is None else _clip(r2)
  auc = metrics.get('roc_auc')
  if auc is not None:
    return _clip((auc - 0.5) / 0.5)
  accuracy = metrics.get('accuracy')
  return None if accuracy is None else _clip(accuracy)


def _compared(validation: Dict[str, Any]):
  """(features compared, features over threshold) over drift and skew."""
  compared = drifted = 0
  for kind, over in (('drift', 'drifted'), ('skew', 'skewed')):
    values = validation.get(kind) or {}
    compared += sum(1 for v in values.values() if v is not None)
    drifted += len(validation.get(over) or [])
  return compared, drifted


def health(summary: Dict[str, Any]) -> Dict[str, Any]:
  """The run's health score in 0..1 and its parts (README, "Health score").

  parts (each 0..1, absent when the run has nothing to measure it by):
    validity   records valid / records read (0 when nothing was read)
    anomalies  0.5 per ERROR x 0.9 per WARNING x 0.99 per INFO
    drift      1 - features over their drift or skew threshold / compared
    model      `model_quality` of the eval metrics
  score = completion x sum(weight x part) / sum(weight) over the parts
  present (WEIGHTS), completion 1 for a run that ended ok, STOPPED_FACTOR
  for one the validation gate stopped, 0 for a failed one.
  """
  parts: Dict[str, float] = {}
  read = summary.get('records_read')
  if read is not None:
    parts['validity'] = (summary.get('records_valid', 0) / read) if read \
        else 0.0
  checked = summary.get('validation')
  if checked:
    counts = checked.get('anomalies') or {}
    parts['anomalies'] = math.prod(
        factor ** counts.get(severity, 0)
        for severity, factor in ANOMALY_FACTOR.items())
    compared, drifted = _compared(checked)
    if compared:
      parts['drift'] = 1.0 - drifted / compared
  quality = model_quality(summary.get('model'))
  if quality is not None:
    parts['model'] = quality
  status = summary.get('status', '')
  completion = (1.0 if status == 'ok' else
                STOPPED_FACTOR if status.startswith('stopped') else 0.0)
  weight = sum(WEIGHTS[k] for k in parts)
  mean = sum(WEIGHTS[k] * v for k, v in parts.items()) / weight if weight \
      else 0.0
  return {'score': round(completion * mean, 4),
          'parts': {k: round(v, 4) for k, v in parts.items()},
          'completion': completion}


# Metric families --------------------------------------------------------------
def _name(text: str) -> str:
  return f'{PREFIX}_{text}'


def families(summary: Dict[str, Any],
             extra_labels: Optional[Dict[str, str]] = None) -> List[Any]:
  """The metric families of a run summary (a batch run's, a streaming
  replay's, or live Beam counters shaped like one)."""
  out = []

  def counter(name, doc, value, labels=None):
    if value is None:
      return
    family = CounterMetricFamily(_name(name), doc,
                                 labels=sorted(labels) if labels else None)
    if labels:
      family.add_metric([labels[k] for k in sorted(labels)], value)
    else:
      family.add_metric([], value)
    out.append(family)

  counter('records_read', 'Records read from the input.',
          summary.get('records_read'))
  counter('records_valid', 'Records that passed parsing and validation.',
          summary.get('records_valid'))
  dead = CounterMetricFamily(_name('records_dead_lettered'),
                             'Records written to the dead-letter output, by '
                             'error kind.', labels=['kind'])
  for kind, count in sorted((summary.get('dead_letter_by_kind') or {}
                             ).items()):
    dead.add_metric([kind], count)
  out.append(dead)
  counter('feature_rows', 'Rows of the feature table.',
          summary.get('feature_rows'))
  aggregates = CounterMetricFamily(_name('aggregate_rows'),
                                   'Windowed aggregate rows, by key.',
                                   labels=['key'])
  for key, count in sorted((summary.get('aggregate_rows') or {}).items()):
    aggregates.add_metric([key], count)
  out.append(aggregates)
  counter('predictions', 'Predictions written.',
          summary.get('predictions_written'))
  if 'records_late' in summary:
    counter('records_late', 'Records too late for their aggregate window.',
            summary.get('records_late'))

  stages = GaugeMetricFamily(_name('stage_duration_seconds'),
                             'Wall time of each stage of the run.',
                             labels=['stage'])
  for stage, seconds in (summary.get('stage_seconds') or {}).items():
    stages.add_metric([stage], seconds)
  out.append(stages)

  checked = summary.get('validation') or {}
  anomalies = GaugeMetricFamily(_name('anomalies'),
                                'Validation anomalies, by severity.',
                                labels=['severity'])
  for severity, count in sorted((checked.get('anomalies') or {}).items()):
    anomalies.add_metric([severity], count)
  out.append(anomalies)
  distance = GaugeMetricFamily(
      _name('drift_distance'), 'Drift (against --baseline_stats) and '
      'training/serving skew distance of each compared feature.',
      labels=['kind', 'feature'])
  for kind in ('drift', 'skew'):
    for feature, value in sorted((checked.get(kind) or {}).items()):
      if value is not None:
        distance.add_metric([kind, feature], value)
  out.append(distance)
  over = GaugeMetricFamily(_name('drifted_features'),
                           'Features over their drift or skew threshold.',
                           labels=['kind'])
  for kind, key in (('drift', 'drifted'), ('skew', 'skewed')):
    if checked.get(key) is not None:
      over.add_metric([kind], len(checked[key]))
  out.append(over)

  model = summary.get('model')
  if model:
    metric = GaugeMetricFamily(_name('model_metric'),
                               "The scoring model's metrics, by split.",
                               labels=['split', 'metric'])
    for split, values in sorted((model.get('metrics') or {}).items()):
      for name, value in sorted(values.items()):
        if isinstance(value, (int, float)) and value is not None:
          metric.add_metric([split, name], value)
    out.append(metric)
    info = InfoMetricFamily(_name('model'), 'The model that scored.',
                            value={'version': str(model.get('version')),
                                   'type': str(model.get('type')),
                                   'task': str(model.get('task'))})
    out.append(info)

  if 'health' in summary:
    score = GaugeMetricFamily(_name('health_score'),
                              'Run health, 0..1 (README: Health score).')
    score.add_metric([], summary['health']['score'])
    out.append(score)
    part = GaugeMetricFamily(_name('health_part'),
                             'The parts of the health score, 0..1.',
                             labels=['part'])
    for name, value in sorted(summary['health']['parts'].items()):
      part.add_metric([name], value)
    out.append(part)
  if summary.get('status'):
    status = InfoMetricFamily(_name('run'), 'How the run ended.',
                              value=dict({'status': summary['status']},
                                         **(extra_labels or {})))
    out.append(status)
  return out


class SummaryCollector:
  """A prometheus_client collector of one summary (replaceable)."""

  def __init__(self, summary: Optional[Dict[str, Any]] = None):
    self._summary = summary or {}
    self._lock = threading.Lock()

  def update(self, summary: Dict[str, Any]):
    with self._lock:
      self._summary = summary

  def collect(self) -> Iterable[Any]:
    with self._lock:
      summary = self._summary
    return families(summary)


def exposition_text_of(collector) -> str:
  """The Prometheus text exposition of one collector."""
  registry = CollectorRegistry(auto_describe=False)
  registry.register(collector)
  return exposition.generate_latest(registry).decode('utf-8')


def exposition_text(summary: Dict[str, Any]) -> str:
  return exposition_text_of(SummaryCollector(summary))


def write_metrics(summary: Dict[str, Any], path: str) -> str:
  """Writes the summary's metrics to `path` (local: prometheus_client's
  write_to_textfile, which renames a temporary file into place so the
  collector never reads half a file; gs://: one upload)."""
  if '://' in path:
    with FileSystems.create(path, mime_type='text/plain') as f:
      f.write(exposition_text(summary).encode('utf-8'))
    return path
  registry = CollectorRegistry(auto_describe=False)
  registry.register(SummaryCollector(summary))
  exposition.write_to_textfile(path, registry)
  return path


# The streaming job's endpoint ---------------------------------------------------
class LiveCollector(SummaryCollector):
  """While the job runs, each scrape reads the job's Beam counters
  (`PipelineResult.metrics()`, namespace mlpipe); `update` replaces them
  with the final summary when the job ends."""

  def __init__(self, result=None):
    super().__init__({'status': 'running'})
    self._result = result

  def update(self, summary: Dict[str, Any]):
    with self._lock:
      self._result = None
      self._summary = summary

  def collect(self) -> Iterable[Any]:
    with self._lock:
      result, summary = self._result, self._summary
    if result is not None:
      summary = dict(live_summary(result), status='running')
    return families(summary, {'source': 'beam counters' if result is not None
                              else 'final summary'})


def live_summary(result) -> Dict[str, Any]:
  """The counters the job has reported so far, shaped like a summary."""
  from pipelines.outputs import summary as summary_lib
  counts = summary_lib.counters(result)
  out = summary_lib.ingest_summary(counts)
  out.pop('records_accounted_for')
  out['feature_rows'] = counts.get('feature_rows', 0)
  out['predictions_written'] = counts.get('predictions_written', 0)
  out['records_late'] = counts.get('records_late', 0)
  return out


def serve(port: int, result=None, addr: str = '127.0.0.1'):
  """Starts prometheus_client's HTTP server on addr:port (a daemon thread:
  it serves until the process ends); returns (collector, server)."""
  from prometheus_client import start_http_server
  registry = CollectorRegistry(auto_describe=False)
  collector = LiveCollector(result)
  registry.register(collector)
  server, _ = start_http_server(port, addr=addr, registry=registry)
  return collector, server
