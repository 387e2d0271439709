"""Data validation of feature statistics with TFDV (driver side, no Beam).

  * `detect` / `validate`: schema anomalies of one statistics proto, each
    with a severity (ERROR / WARNING / INFO) from `SEVERITY_BY_TYPE`;
  * `drift` / `skew`: the distance of every feature with a drift (skew)
    comparator in the schema, with thresholds and verdicts: TFDV's
    L-infinity distance for categorical features, the Jensen-Shannon
    distance on the baseline's quantile bins (`quantile_drift`) for numeric
    ones, whose `jensen_shannon` threshold TFDV itself no longer judges;
  * `gate`: stops a run on ERROR anomalies;
  * `write_anomalies`, `write_drift`: anomalies.pbtxt, anomalies.json,
    drift.json (local paths or any Beam filesystem, e.g. gs://);
  * `run`: all of the above plus the HTML report, for one run's statistics.
"""

import json
import logging
from typing import Any, Dict, Iterable, List, Optional

from pipelines.base.errors import GateStopped
from pipelines.base.quiet import import_tfdv
tfdv = import_tfdv()
from apache_beam.io.filesystems import FileSystems
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tensorflow_metadata.proto.v0 import schema_pb2
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipelines.validation import quantile_drift, stats_report
from schemas.dataset import Dataset

ERROR, WARNING, INFO = 'ERROR', 'WARNING', 'INFO'
SEVERITIES = (ERROR, WARNING, INFO)

ANOMALIES_PBTXT = 'anomalies.pbtxt'
ANOMALIES_JSON = 'anomalies.json'
DRIFT_JSON = 'drift.json'
SKEW_JSON = 'skew.json'
REPORT_HTML = 'stats.html'

# TFDV marks nearly every anomaly ERROR; ours depend on what the anomaly
# means for a model trained on this data. Reason types not listed here are
# ERROR (an anomaly nobody has classified should stop the run, not pass).
#
# ERROR: the data breaks the schema's contract: a required feature is
#   missing or has no value, a value has the wrong type, a number is out of
#   its declared range, a string is outside a hard (`allowed`) domain (the
#   parser dead-letters those, so one here means a bug upstream), the
#   dataset is empty.
# WARNING: the data is valid but has moved: a new value in a soft (`domain`)
#   categorical domain (the model's vocabulary has an OOV bucket for it, so
#   it is served, but the domain may need updating), drift or training/
#   serving skew above the schema threshold (a reason to look and maybe
#   retrain, not to stop a batch run), a column the schema does not know.
# INFO: informational changes with no effect on the model.
_ERROR_TYPES = (
    # Missing or empty values of required features.
    'SCHEMA_MISSING_COLUMN', 'FEATURE_TYPE_NOT_PRESENT',
    'FEATURE_TYPE_LOW_FRACTION_PRESENT', 'FEATURE_TYPE_LOW_NUMBER_PRESENT',
    'FEATURE_TYPE_NO_VALUES', 'FEATURE_TYPE_LOW_NUMBER_VALUES',
    'FEATURE_TYPE_HIGH_NUMBER_VALUES', 'FEATURE_TYPE_UNEXPECTED_REPEATED',
    'VALUE_NESTEDNESS_MISMATCH', 'INVALID_FEATURE_SHAPE',
    # Values out of the declared numeric range, NaN, infinities.
    'FLOAT_TYPE_BIG_FLOAT', 'FLOAT_TYPE_SMALL_FLOAT', 'FLOAT_TYPE_HAS_NAN',
    'FLOAT_TYPE_HAS_INF', 'INT_TYPE_BIG_INT', 'INT_TYPE_SMALL_INT',
    'BOOL_TYPE_BIG_INT', 'BOOL_TYPE_SMALL_INT',
    # Wrong types.
    'UNEXPECTED_DATA_TYPE', 'FLOAT_TYPE_NOT_FLOAT',
    'FLOAT_TYPE_STRING_NOT_FLOAT', 'FLOAT_TYPE_NON_STRING',
    'FLOAT_TYPE_UNKNOWN_TYPE_NUMBER', 'INT_TYPE_INT_EXPECTED',
    'INT_TYPE_NOT_INT_STRING', 'INT_TYPE_NOT_STRING',
    'INT_TYPE_STRING_EXPECTED', 'INT_TYPE_UNKNOWN_TYPE_NUMBER',
    'STRING_TYPE_NOW_FLOAT', 'STRING_TYPE_NOW_INT',
    'ENUM_TYPE_BYTES_NOT_STRING', 'ENUM_TYPE_FLOAT_NOT_STRING',
    'ENUM_TYPE_INT_NOT_STRING', 'ENUM_TYPE_INVALID_UTF8',
    # Hard domains (soft ones are downgraded in `_severity`).
    'ENUM_TYPE_UNEXPECTED_STRING_VALUES',
    # Dataset level.
    'NO_DATA_IN_SPAN', 'DATASET_LOW_NUM_EXAMPLES',
    # The schema itself is broken.
    'INVALID_SCHEMA_SPECIFICATION', 'INVALID_DOMAIN_SPECIFICATION',
    'DOMAIN_INVALID_FOR_TYPE', 'FEATURE_MISSING_NAME', 'FEATURE_MISSING_TYPE',
)
_WARNING_TYPES = (
    'COMPARATOR_L_INFTY_HIGH', 'COMPARATOR_JENSEN_SHANNON_DIVERGENCE_HIGH',
    'COMPARATOR_NORMALIZED_ABSOLUTE_DIFFERENCE_HIGH',
    'COMPARATOR_CONTROL_DATA_MISSING', 'COMPARATOR_TREATMENT_DATA_MISSING',
    'SCHEMA_TRAINING_SERVING_SKEW', 'SCHEMA_NEW_COLUMN',
    'DATASET_HIGH_NUM_EXAMPLES',
)
_INFO_TYPES = (
    'COMPARATOR_LOW_NUM_EXAMPLES', 'COMPARATOR_HIGH_NUM_EXAMPLES',
    'FEATURE_TYPE_HIGH_UNIQUE', 'FEATURE_TYPE_LOW_UNIQUE',
    'FEATURE_TYPE_NO_UNIQUE', 'SEMANTIC_DOMAIN_UPDATE',
)
SEVERITY_BY_TYPE: Dict[str, str] = {
    **{t: ERROR for t in _ERROR_TYPES},
    **{t: WARNING for t in _WARNING_TYPES},
    **{t: INFO for t in _INFO_TYPES},
}
DEFAULT_SEVERITY = ERROR
# New values in a soft (`domain:`) categorical domain.
SOFT_DOMAIN_SEVERITY = WARNING
_SOFT_DOMAIN_TYPES = ('ENUM_TYPE_UNEXPECTED_STRING_VALUES',)

DATASET_FEATURE = '*dataset*'   # `feature` of dataset-level anomalies

_MEASURES = {
    anomalies_pb2.DriftSkewInfo.Measurement.L_INFTY: 'l_infinity',
    anomalies_pb2.DriftSkewInfo.Measurement.JENSEN_SHANNON_DIVERGENCE:
        'jensen_shannon_divergence',
    anomalies_pb2.DriftSkewInfo.Measurement.NORMALIZED_ABSOLUTE_DIFFERENCE:
        'normalized_abs_difference',
}


class DataValidationError(GateStopped):
  """ERROR anomalies were found and the run was told to fail on them."""

  def __init__(self, anomalies: List[Dict[str, Any]]):
    self.anomalies = anomalies
    lines = [f'  {a["feature"]}: {a["type"]}: {a["description"]}'
             for a in anomalies]
    super().__init__(
        f'data validation failed with {len(anomalies)} ERROR '
        f'anomal{"y" if len(anomalies) == 1 else "ies"}:\n' +
        '\n'.join(lines))


def soft_domain_features(dataset: Dataset) -> List[str]:
  """Names of the fields whose categorical domain is soft (yaml `domain:`)."""
  return [name for name, f in dataset.fields.items() if f.domain]


# Anomalies --------------------------------------------------------------------
def detect(stats: statistics_pb2.DatasetFeatureStatisticsList,
           schema: schema_pb2.Schema, environment: Optional[str] = 'TRAINING',
           baseline_stats=None, serving_stats=None) -> anomalies_pb2.Anomalies:
  """The TFDV Anomalies proto of `stats` against `schema`.

  With `baseline_stats` (previous span) or `serving_stats` the drift and
  skew comparators of the schema run too: TFDV's for categorical features,
  ours (`quantile_drift`) for numeric ones, whose anomalies are added to
  the proto with TFDV's reason type.
  """
  proto = tfdv.validate_statistics(
      stats, _without_numeric_js(schema), environment=environment,
      previous_statistics=baseline_stats, serving_statistics=serving_stats)
  if baseline_stats is not None:
    _add_numeric_anomalies(proto, 'drift', _numeric_measurements(
        'drift', schema, current=stats, baseline=baseline_stats))
  if serving_stats is not None:
    _add_numeric_anomalies(proto, 'skew', _numeric_measurements(
        'skew', schema, current=serving_stats, baseline=stats))
  return proto


def anomaly_list(anomalies: anomalies_pb2.Anomalies,
                 soft_domains: Iterable[str] = ()) -> List[Dict[str, Any]]:
  """One dict per anomaly reason, ERRORs first, then by feature and type.

  Keys: feature, type (TFDV AnomalyInfo.Type name), severity, description,
  short_description.
  """
  soft = set(soft_domains)
  out = []
  infos = list(anomalies.anomaly_info.items())
  if anomalies.HasField('dataset_anomaly_info'):
    infos.append((DATASET_FEATURE, anomalies.dataset_anomaly_info))
  for name, info in infos:
    reasons = list(info.reason) or [anomalies_pb2.AnomalyInfo.Reason(
        description=info.description,
        short_description=info.short_description)]
    for reason in reasons:
      kind = anomalies_pb2.AnomalyInfo.Type.Name(reason.type)
      out.append({
          'feature': name, 'type': kind,
          'severity': _severity(kind, name in soft),
          'description': reason.description.strip(),
          'short_description': reason.short_description,
      })
  if anomalies.data_missing and not any(
      a['type'] == 'NO_DATA_IN_SPAN' for a in out):
    out.append({'feature': DATASET_FEATURE, 'type': 'NO_DATA_IN_SPAN',
                'severity': ERROR,
                'description': 'The statistics hold no data.',
                'short_description': 'No data'})
  rank = {s: i for i, s in enumerate(SEVERITIES)}
  out.sort(key=lambda a: (rank[a['severity']], a['feature'], a['type']))
  return out


def _severity(kind: str, soft_domain: bool) -> str:
  if soft_domain and kind in _SOFT_DOMAIN_TYPES:
    return SOFT_DOMAIN_SEVERITY
  return SEVERITY_BY_TYPE.get(kind, DEFAULT_SEVERITY)


def validate(stats: statistics_pb2.DatasetFeatureStatisticsList,
             schema: schema_pb2.Schema, environment: Optional[str] = 'TRAINING',
             soft_domains: Iterable[str] = (), baseline_stats=None,
             serving_stats=None) -> List[Dict[str, Any]]:
  """Anomalies of `stats` against `schema` as dicts with severities.

  Pass `soft_domains=soft_domain_features(dataset)` so that new values of a
  soft categorical domain are WARNINGs; without it every string domain is
  treated as hard (ERROR).
  """
  return anomaly_list(
      detect(stats, schema, environment, baseline_stats, serving_stats),
      soft_domains)


def severity_counts(anomalies: List[Dict[str, Any]]) -> Dict[str, int]:
  counts = {s: 0 for s in SEVERITIES}
  for a in anomalies:
    counts[a['severity']] += 1
  return counts


def gate(anomalies: List[Dict[str, Any]], fail_on_anomalies: bool = True
         ) -> List[Dict[str, Any]]:
  """Raises DataValidationError on ERROR anomalies if `fail_on_anomalies`.

  Returns the ERROR anomalies (logged as a warning when not failing).
  """
  errors = [a for a in anomalies if a['severity'] == ERROR]
  if errors and fail_on_anomalies:
    raise DataValidationError(errors)
  if errors:
    logging.warning('%d ERROR anomalies ignored (fail_on_anomalies=False): %s',
                    len(errors), ', '.join(sorted({a['feature']
                                                   for a in errors})))
  return errors


# Drift and skew ---------------------------------------------------------------
def drift(stats: statistics_pb2.DatasetFeatureStatisticsList,
          baseline_stats: statistics_pb2.DatasetFeatureStatisticsList,
          schema: schema_pb2.Schema) -> Dict[str, Any]:
  """Distances between `stats` and `baseline_stats` per drift comparator.

  Categorical features: TFDV's L-infinity distance of the value
  distributions (`Anomalies.drift_skew_info`). Numeric features with a
  Jensen-Shannon threshold: `quantile_drift.distance` on the baseline's
  quantile bins. See `_compare` for the result's layout.
  """
  anomalies = tfdv.validate_statistics(
      stats, _without_numeric_js(schema), previous_statistics=baseline_stats)
  return _compare('drift', anomalies, schema, stats, baseline_stats,
                  _numeric_measurements('drift', schema, current=stats,
                                        baseline=baseline_stats))


def skew(training_stats: statistics_pb2.DatasetFeatureStatisticsList,
         serving_stats: statistics_pb2.DatasetFeatureStatisticsList,
         schema: schema_pb2.Schema) -> Dict[str, Any]:
  """Training/serving skew per skew comparator; same layout as `drift`
  (the training statistics are the baseline of the quantile bins)."""
  anomalies = tfdv.validate_statistics(
      training_stats, _without_numeric_js(schema),
      serving_statistics=serving_stats)
  return _compare('skew', anomalies, schema, training_stats, serving_stats,
                  _numeric_measurements('skew', schema, current=serving_stats,
                                        baseline=training_stats))


def _comparator_field(kind: str) -> str:
  return 'drift_comparator' if kind == 'drift' else 'skew_comparator'


def _is_numeric(feature: schema_pb2.Feature) -> bool:
  return (feature.type in (schema_pb2.FLOAT, schema_pb2.INT) and
          not feature.int_domain.is_categorical)


def _numeric_js(schema: schema_pb2.Schema, kind: str):
  """(feature, threshold) of the numeric features with a Jensen-Shannon
  threshold in their `kind` comparator: the ones `quantile_drift` measures."""
  field = _comparator_field(kind)
  for feature in schema.feature:
    comparator = getattr(feature, field)
    if (feature.HasField(field) and _is_numeric(feature) and
        comparator.HasField('jensen_shannon_divergence')):
      yield feature, comparator.jensen_shannon_divergence.threshold


def _without_numeric_js(schema: schema_pb2.Schema) -> schema_pb2.Schema:
  """A copy of `schema` whose numeric features have no Jensen-Shannon
  comparator: TFDV's equal-width measure of them would flag resamples."""
  copy = schema_pb2.Schema()
  copy.CopyFrom(schema)
  for kind in ('drift', 'skew'):
    field = _comparator_field(kind)
    for feature, _ in list(_numeric_js(copy, kind)):
      comparator = getattr(feature, field)
      comparator.ClearField('jensen_shannon_divergence')
      if not comparator.ListFields():
        feature.ClearField(field)
  return copy


def _feature_stats(stats) -> Dict[str, Any]:
  if not stats or not stats.datasets:
    return {}
  return {'.'.join(f.path.step) or f.name: f
          for f in stats.datasets[0].features}


def _numeric_measurements(kind, schema, current, baseline
                          ) -> Dict[str, List[Dict[str, Any]]]:
  """name -> [measurement] for the features `quantile_drift` measures; a
  feature without quantiles on either side is left out (not compared)."""
  now, then = _feature_stats(current), _feature_stats(baseline)
  out = {}
  for feature, threshold in _numeric_js(schema, kind):
    if feature.name not in now or feature.name not in then:
      continue
    value = quantile_drift.distance(now[feature.name], then[feature.name])
    if value is not None:
      out[feature.name] = [{'measure': quantile_drift.MEASURE,
                            'value': value, 'threshold': threshold,
                            'drifted': value > threshold}]
  return out


def _add_numeric_anomalies(proto: anomalies_pb2.Anomalies, kind: str,
                           measured: Dict[str, List[Dict[str, Any]]]) -> None:
  """Adds an anomaly reason to `proto` per measurement over its threshold,
  in TFDV's words and with its reason type for a Jensen-Shannon comparator."""
  sides = 'current and previous' if kind == 'drift' else (
      'training and serving')
  for name, items in sorted(measured.items()):
    for m in items:
      if not m['drifted']:
        continue
      short = f'High Jensen-Shannon distance between {sides}'
      text = (f'The Jensen-Shannon distance on the baseline\'s quantile bins '
              f'between {sides} is {m["value"]:.6g}, above the threshold '
              f'{m["threshold"]:.6g}.')
      info = proto.anomaly_info[name]
      if not info.path.step:
        info.path.step.append(name)
        info.severity = anomalies_pb2.AnomalyInfo.ERROR
        info.description, info.short_description = text, short
      info.reason.add(
          type=anomalies_pb2.AnomalyInfo.COMPARATOR_JENSEN_SHANNON_DIVERGENCE_HIGH,
          short_description=short, description=text)


def _compare(kind, anomalies, schema, stats, control, numeric
             ) -> Dict[str, Any]:
  """{kind, num_examples: {current, baseline}, drifted: [names], features}.

  features: name -> {measure, value, threshold, drifted, measurements}, one
  entry for every feature with a comparator of `kind` in the schema. The
  flat fields hold the measurement closest to (or furthest over) its
  threshold; `measurements` lists all of them (TFDV's from `anomalies`,
  then ours from `numeric`). A feature that could not be compared (absent
  from either side) has value None, drifted False and a `note`.
  """
  comparator = _comparator_field(kind)
  measured = {}
  for info in anomalies.drift_skew_info:
    name = '.'.join(info.path.step)
    items = info.drift_measurements if kind == 'drift' else (
        info.skew_measurements)
    measured[name] = [
        {'measure': _MEASURES.get(m.type, 'unknown'), 'value': m.value,
         'threshold': m.threshold, 'drifted': m.value > m.threshold}
        for m in items]
  for name, items in numeric.items():
    measured[name] = measured.get(name, []) + items
  numeric_js = {f.name for f, _ in _numeric_js(schema, kind)}
  features = {}
  for feature in schema.feature:
    if not feature.HasField(comparator):
      continue
    items = measured.get(feature.name)
    if items:
      worst = max(items, key=lambda m: m['value'] / m['threshold']
                  if m['threshold'] else float('inf'))
      features[feature.name] = dict(worst, measurements=items)
    else:
      measure, threshold = _configured(getattr(feature, comparator),
                                       feature.name in numeric_js)
      features[feature.name] = {
          'measure': measure, 'value': None, 'threshold': threshold,
          'drifted': False, 'measurements': [],
          'note': 'not compared: the feature has no statistics on one side'}
  return {
      'kind': kind,
      'num_examples': {'current': _num_examples(stats),
                       'baseline': _num_examples(control)},
      'drifted': sorted(n for n, f in features.items() if f['drifted']),
      'features': features,
  }


def _configured(comparator, numeric: bool):
  """(measure, threshold) of the first measure a comparator configures."""
  js = quantile_drift.MEASURE if numeric else 'jensen_shannon_divergence'
  for field, measure in (('jensen_shannon_divergence', js),
                         ('infinity_norm', 'l_infinity'),
                         ('normalized_abs_difference',
                          'normalized_abs_difference')):
    if comparator.HasField(field):
      return measure, getattr(comparator, field).threshold
  return 'unknown', None


def _num_examples(stats) -> int:
  return int(stats.datasets[0].num_examples) if stats.datasets else 0


# Output -----------------------------------------------------------------------
def _write_text(path: str, text: str) -> str:
  with FileSystems.create(path, mime_type='text/plain') as f:
    f.write(text.encode('utf-8'))
  return path


def write_anomalies(anomalies_proto: anomalies_pb2.Anomalies,
                    anomalies_list: List[Dict[str, Any]], out_dir: str
                    ) -> Dict[str, str]:
  """Writes anomalies.pbtxt (TFDV text proto) and anomalies.json.

  anomalies.json: {"counts": {"ERROR": n, "WARNING": n, "INFO": n},
  "anomalies": [...]}. Returns {'pbtxt': path, 'json': path}.
  """
  pbtxt = _write_text(FileSystems.join(out_dir, ANOMALIES_PBTXT),
                      text_format.MessageToString(anomalies_proto))
  body = {'counts': severity_counts(anomalies_list),
          'anomalies': anomalies_list}
  js = _write_text(FileSystems.join(out_dir, ANOMALIES_JSON),
                   json.dumps(body, indent=2, sort_keys=True) + '\n')
  return {'pbtxt': pbtxt, 'json': js}


def write_drift(result: Dict[str, Any], path: str) -> str:
  """Writes a `drift` or `skew` result as JSON; `path` is usually drift.json."""
  return _write_text(path, json.dumps(result, indent=2, sort_keys=True) + '\n')


def run(stats: statistics_pb2.DatasetFeatureStatisticsList, dataset: Dataset,
        out_dir: str, baseline_stats=None, serving_stats=None,
        training_stats=None, fail_on_anomalies: bool = True,
        schema: Optional[schema_pb2.Schema] = None,
        environment: Optional[str] = 'TRAINING') -> Dict[str, Any]:
  """Validates one run's statistics and writes everything to `out_dir`.

  Writes anomalies.pbtxt/.json, drift.json (with `baseline_stats`),
  skew.json (with `serving_stats`, or with `training_stats` when `stats`
  are the serving data scored by a trained model) and stats.html, then applies `gate`: the
  outputs exist even when the run fails. `schema` defaults to the
  dataset's. Returns {'anomalies', 'counts', 'drift', 'skew', 'paths'}.
  """
  schema = schema or dataset.tfdv_schema()
  proto = detect(stats, schema, environment, baseline_stats, serving_stats)
  found = anomaly_list(proto, soft_domain_features(dataset))
  paths = write_anomalies(proto, found, out_dir)
  comparisons = []
  result = {'anomalies': found, 'counts': severity_counts(found),
            'drift': None, 'skew': None}
  if baseline_stats is not None:
    result['drift'] = drift(stats, baseline_stats, schema)
    paths['drift'] = write_drift(result['drift'],
                                 FileSystems.join(out_dir, DRIFT_JSON))
    comparisons.append(result['drift'])
  if serving_stats is not None or training_stats is not None:
    result['skew'] = (skew(stats, serving_stats, schema)
                      if serving_stats is not None else
                      skew(training_stats, stats, schema))
    paths['skew'] = write_drift(result['skew'],
                                FileSystems.join(out_dir, SKEW_JSON))
    comparisons.append(result['skew'])
  paths['html'] = stats_report.write_html(
      FileSystems.join(out_dir, REPORT_HTML), stats, found, comparisons,
      title=f'{dataset.name}: feature statistics',
      timestamp_features=[dataset.timestamp_field] if dataset.timestamp_field
      else [])
  result['paths'] = paths
  try:
    gate(found, fail_on_anomalies)
  except DataValidationError as e:
    e.checked = result  # what the caller reports for the stopped run
    raise
  return result
