"""pipelines.monitor: predictions joined with late labels, against
scikit-learn and SciPy on rows joined by hand here.

The predictions and labels are made here (no Beam run): 400 predictions in
two Parquet files, five ids scored twice; labels in JSON lines and CSV for
all but the first 30 ids, 20 labels for ids no prediction has, repeated and
conflicting labels, and rows the parser rejects. The model folder holds
only what monitoring reads (metadata.json and a file it lists).
"""

import csv
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import (average_precision_score, confusion_matrix,
                             precision_score, recall_score, roc_auc_score)

from pipelines import monitor
from pipelines.model import monitoring as monitor_lib
from pipelines.model.registry import Registry
from schemas.dataset import load_dataset

N = 400
VERSION = 'v0123456789abcdef'
THRESHOLD = 0.5
DAY_US = 86_400_000_000
START_US = 1_788_220_800_000_000   # 2026-09-01T00:00:00Z
UNLABELLED = range(0, 30)          # predictions whose label never came
RESCORED = range(50, 55)           # scored again in the second file
UNKNOWN = 20                       # labels for ids no prediction has
REPEATED, CONFLICTING = (100, 101), 102
UNDATED = (200, 201)               # labels without an event time


def _id(i):
  return f'tx{i:09d}'


def _iso(us):
  import datetime
  return datetime.datetime.fromtimestamp(
      us / 1e6, tz=datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


@pytest.fixture(scope='module')
def truth():
  rng = np.random.default_rng(0)
  labels = (rng.random(N) < 0.2).astype(int)
  scores = np.clip(0.4 * labels + 0.6 * rng.beta(2, 4, N), 0, 1)
  # Four days, ids in time order.
  times = START_US + (np.arange(N) * 4 * DAY_US) // N
  return labels, scores, times


def _write_model(folder, version, reference_scores):
  os.makedirs(folder)
  data = b'monitoring never loads the estimator'
  with open(os.path.join(folder, 'model.skops'), 'wb') as f:
    f.write(data)
  counts, edges = np.histogram(reference_scores, bins=20, range=(0.0, 1.0))
  with open(os.path.join(folder, 'metadata.json'), 'w') as f:
    json.dump({
        'model_version': version, 'model_type': 'gbt', 'task': 'binary',
        'threshold': THRESHOLD, 'id_field': 'transaction_id',
        'id_type': 'string', 'label_field': 'is_fraud',
        'classes': ['0', '1'],
        'metrics': {'eval': {'roc_auc': 0.9, 'pr_auc': 0.6,
                             'precision': 0.5, 'recall': 0.7,
                             'brier': 0.1}},
        'eval_score_distribution': {'edges': edges.tolist(),
                                    'counts': counts.tolist()},
        'files': {'model.skops': hashlib.sha256(data).hexdigest()}}, f)
  return folder


@pytest.fixture(scope='module')
def inputs(truth, tmp_path_factory):
  labels, scores, times = truth
  root = tmp_path_factory.mktemp('monitor')
  schema = load_dataset().prediction_schema()

  def predictions(rows, score):
    columns = {'transaction_id': [_id(i) for i in rows], 'score': score,
               'predicted_label': (score >= THRESHOLD).astype(int),
               'model_version': [VERSION] * len(rows),
               'scored_at': ['2026-09-06T00:00:00Z'] * len(rows)}
    # Columns monitoring does not read (risk bands) stay null.
    return pa.table({f.name: columns.get(f.name, pa.nulls(len(rows), f.type))
                     for f in schema}, schema=schema)

  os.makedirs(root / 'predictions')
  first, second = np.arange(0, 200), np.arange(200, N)
  pq.write_table(predictions(first, scores[first]),
                 root / 'predictions' / 'predictions-00000-of-00002.parquet')
  again = np.array(RESCORED)
  pq.write_table(
      pa.concat_tables([predictions(second, scores[second]),
                        predictions(again, 1 - scores[again])]),
      root / 'predictions' / 'predictions-00001-of-00002.parquet')

  rows = []
  for i in range(N):
    if i in UNLABELLED:
      continue
    row = {'transaction_id': _id(i), 'is_fraud': int(labels[i]),
           'event_time': _iso(times[i])}
    if i in UNDATED:
      del row['event_time']
    rows.append(row)
  for i in REPEATED:
    rows.append({'transaction_id': _id(i), 'is_fraud': int(labels[i]),
                 'event_time': _iso(times[i])})
  rows.append({'transaction_id': _id(CONFLICTING),
               'is_fraud': 1 - int(labels[CONFLICTING]),
               'event_time': _iso(times[CONFLICTING])})
  for k in range(UNKNOWN):
    rows.append({'transaction_id': _id(900_000_000 + k), 'is_fraud': k % 2,
                 'event_time': _iso(START_US)})
  rejected = [{'transaction_id': _id(700_000_000), 'is_fraud': 7,
               'event_time': _iso(START_US)},          # not a class
              {'is_fraud': 1, 'event_time': _iso(START_US)}]  # no id
  os.makedirs(root / 'labels')
  half = len(rows) // 2
  with open(root / 'labels' / 'a.jsonl', 'w') as f:
    for row in rows[:half] + rejected:
      f.write(json.dumps(row) + '\n')
  with open(root / 'labels' / 'b.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, ['transaction_id', 'is_fraud', 'event_time'])
    writer.writeheader()
    writer.writerows(rows[half:])
  model = _write_model(str(root / 'model'), VERSION, scores[:200] * 0.8)
  return {'root': root, 'model': model,
          'predictions': str(root / 'predictions'),
          'labels': str(root / 'labels' / '*')}


def _argv(inputs, out, model=None):
  return ['--predictions', inputs['predictions'], '--labels',
          inputs['labels'], '--model_dir', model or inputs['model'],
          '--output_dir', str(out)]


@pytest.fixture(scope='module')
def report(inputs):
  out = monitor.run(_argv(inputs, inputs['root'] / 'out'))
  on_disk = json.load(open(inputs['root'] / 'out' / 'monitoring' /
                           'report.json'))
  assert on_disk == {k: v for k, v in out.items() if k != 'path'}
  return on_disk


def _joined(truth):
  """The rows the report must use, joined here row by row: ids 30..399
  with their first label and their first score."""
  labels, scores, times = truth
  rows = [i for i in range(N) if i not in UNLABELLED]
  return labels[rows], scores[rows], times[rows], rows


def test_metrics_equal_scikit_learns_on_the_joined_rows(report, truth):
  y, s, _, _ = _joined(truth)
  m = report['metrics']
  predicted = (s >= THRESHOLD).astype(int)
  assert m['rows'] == len(y) == N - len(UNLABELLED)
  assert m['positives'] == y.sum()
  assert m['roc_auc'] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
  assert m['pr_auc'] == pytest.approx(average_precision_score(y, s),
                                      abs=1e-12)
  assert m['precision'] == pytest.approx(precision_score(y, predicted))
  assert m['recall'] == pytest.approx(recall_score(y, predicted))
  tn, fp, fn, tp = confusion_matrix(y, predicted).ravel()
  assert m['confusion_matrix'] == {'tn': tn, 'fp': fp, 'fn': fn, 'tp': tp}
  # Calibration: 10 equal-width bins; counts and rates worked out here.
  bins = np.minimum((s * 10).astype(int), 9)
  assert [b['count'] for b in report['calibration']] == np.bincount(
      bins, minlength=10).tolist()
  for b, row in enumerate(report['calibration']):
    if row['count']:
      assert row['positive_rate'] == pytest.approx(y[bins == b].mean())
      assert row['mean_score'] == pytest.approx(s[bins == b].mean())
  assert report['change']['roc_auc'] == pytest.approx(m['roc_auc'] - 0.9)


def test_unmatched_duplicate_and_rejected_rows_are_counted(report):
  c = report['counts']
  assert c['predictions_read'] == N + len(RESCORED)
  assert c['prediction_duplicates'] == len(RESCORED)
  assert c['predictions'] == N
  assert c['predictions_without_label'] == len(UNLABELLED)
  assert c['labels_without_prediction'] == UNKNOWN
  assert c['label_duplicates'] == len(REPEATED) + 1
  assert c['label_conflicts'] == 1
  assert c['labels_rejected'] == 2
  assert c['labels_rejected_by_kind'] == {'missing_required': 1,
                                          'not_allowed': 1}
  labelled = N - len(UNLABELLED)
  assert c['labels'] == labelled + UNKNOWN
  assert c['labels_read'] == c['labels'] + c['label_duplicates']
  assert c['matched'] == labelled
  # Every row read is matched, unmatched or a counted duplicate.
  assert c['predictions_read'] == (c['matched'] + c['prediction_duplicates']
                                   + c['predictions_without_label'])
  assert c['labels_read'] == (c['matched'] + c['label_duplicates'] +
                              c['labels_without_prediction'])


def test_the_daily_trend_sums_to_the_totals(report, truth):
  y, s, times, rows = _joined(truth)
  trend = report['trend']
  assert trend['rows_without_time'] == len(UNDATED)
  days = trend['days']
  assert [d['date'] for d in days] == ['2026-09-01', '2026-09-02',
                                       '2026-09-03', '2026-09-04']
  assert (sum(d['rows'] for d in days) + trend['rows_without_time'] ==
          report['counts']['matched'])
  dated = np.array([i not in UNDATED for i in rows])
  assert sum(d['positives'] for d in days) == y[dated].sum()
  day = (times - START_US) // DAY_US
  for d, row in enumerate(days):
    chosen = dated & (day == d)
    assert row['rows'] == chosen.sum()
    assert row['roc_auc'] == pytest.approx(roc_auc_score(y[chosen],
                                                         s[chosen]))
    assert row['mean_score'] == pytest.approx(s[chosen].mean())


def test_score_drift_is_scipys_jensen_shannon_distance_and_the_psi(
    report, inputs, truth, tmp_path):
  _, scores, _ = truth
  drift = report['score_drift']
  counts, _ = np.histogram(scores, bins=20, range=(0.0, 1.0))
  reference, _ = np.histogram(scores[:200] * 0.8, bins=20, range=(0.0, 1.0))
  assert drift['counts'] == counts.tolist()   # every prediction, once
  assert drift['reference_counts'] == reference.tolist()
  assert drift['js_base'] == 2
  assert drift['js_distance'] == pytest.approx(
      jensenshannon(counts, reference, base=2))
  p = np.maximum(counts / counts.sum(), 1e-4)
  q = np.maximum(reference / reference.sum(), 1e-4)
  assert drift['psi'] == pytest.approx(np.sum((p - q) * np.log(p / q)))
  assert drift['psi'] > 0.1
  # Against a reference of these very scores: no drift at all.
  same = _write_model(str(tmp_path / 'same'), VERSION, scores)
  out = monitor.run(_argv(inputs, tmp_path / 'o', model=same))
  assert out['score_drift']['js_distance'] == pytest.approx(0, abs=1e-9)
  assert out['score_drift']['psi'] == pytest.approx(0, abs=1e-9)


def test_same_inputs_give_byte_identical_reports(inputs, report, tmp_path):
  del report   # the module's run, made first
  first = inputs['root'] / 'out' / 'monitoring' / 'report.json'
  assert monitor.main(_argv(inputs, inputs['root'] / 'out')) == 0
  again = monitor.main(_argv(inputs, tmp_path))
  assert again == 0
  assert (first.read_bytes() ==
          (tmp_path / 'monitoring' / 'report.json').read_bytes())


def test_the_model_comes_from_the_registry_by_the_predictions_version(
    inputs, report, tmp_path, capsys):
  registry = str(tmp_path / 'registry')
  Registry(registry).register(inputs['model'], 'test', at='t0')
  argv = ['--predictions', inputs['predictions'], '--labels',
          inputs['labels'], '--registry', registry, '--output_dir',
          str(tmp_path / 'o')]
  assert monitor.main(argv) == 0
  out = json.load(open(tmp_path / 'o' / 'monitoring' / 'report.json'))
  assert out['model']['dir'] == os.path.join(registry, 'models', VERSION)
  assert out['metrics'] == report['metrics']
  printed = capsys.readouterr().out
  assert 'Matched:               370' in printed and 'Report:' in printed
  # Predictions of a version the registry does not hold: exit 2.
  other = tmp_path / 'other'
  _write_model(str(other), 'v9999999999999999', [0.5])
  empty = str(tmp_path / 'registry2')
  Registry(empty).register(str(other), 'test', at='t0')
  argv[argv.index(registry)] = empty
  assert monitor.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'no version {VERSION}' in err[0]


MULTICLASS = """
name: survey
roles: {id: hh_id, label: risk}
label: {task: multiclass, classes: [low, medium, high]}
fields:
  hh_id: {type: string, required: true}
  income: {type: float, required: true}
  risk: {type: string, required: true}
transform:
  numeric: {income: z_score}
"""


@pytest.mark.parametrize('change,message', [
    ({'--predictions': '/nonexistent/*.parquet'}, 'matched no files'),
    ({'--labels': '/nonexistent/*.jsonl'}, 'matched no files'),
    ({'--schema': 'MULTICLASS'}, 'supports binary labels'),
    ({'--model_dir': 'OTHER'}, 'the predictions come from model'),
    ({'--output_dir': None}, 'required: --output_dir'),
])
def test_bad_inputs_give_one_line_and_exit_2(inputs, tmp_path, capsys,
                                             change, message):
  argv = dict(zip(*[iter(_argv(inputs, tmp_path / 'o'))] * 2))
  for flag, value in change.items():
    if value == 'MULTICLASS':
      value = str(tmp_path / 'survey.yaml')
      (tmp_path / 'survey.yaml').write_text(MULTICLASS)
    elif value == 'OTHER':
      value = _write_model(str(tmp_path / 'm'), 'v1111111111111111', [0.5])
    argv[flag] = value
  flat = [x for k, v in argv.items() if v is not None for x in (k, v)]
  assert monitor.main(flat) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


def test_a_failure_exits_3_with_one_line_and_a_log(inputs, tmp_path, capsys,
                                                   monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('disk on fire\nsecond line')
  monkeypatch.setattr(monitor_lib, 'report', broken)
  assert monitor.main(_argv(inputs, tmp_path)) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'RuntimeError: disk on fire' in err[0]
  log = (tmp_path / 'monitoring' / 'monitor.log').read_text()
  assert 'Traceback' in log and 'second line' in log


def test_the_report_names_the_important_features_that_drifted(
    inputs, truth, tmp_path):
  # The same model with an importance, and the scoring run's validation
  # files beside the report: amount (important) drifted, country did not,
  # channel drifted but is not among the model's important features.
  _, scores, _ = truth
  model = _write_model(str(tmp_path / 'model'), VERSION, scores[:200] * 0.8)
  with open(os.path.join(model, 'metadata.json')) as f:
    metadata = json.load(f)
  metadata['importance'] = {'metric': 'roc_auc', 'features': [
      {'feature': f'f{i}', 'mean': 0.01 - i / 1000, 'std': 0.0,
       'columns': 1} for i in range(12)] + [
      {'feature': 'channel', 'mean': -0.01, 'std': 0.0, 'columns': 1}]}
  metadata['importance']['features'][0]['feature'] = 'amount'
  metadata['importance']['features'][1]['feature'] = 'country'
  with open(os.path.join(model, 'metadata.json'), 'w') as f:
    json.dump(metadata, f)
  out = tmp_path / 'run'
  (out / 'validation').mkdir(parents=True)
  (out / 'validation' / 'drift.json').write_text(json.dumps({'features': {
      'amount': {'value': 0.3, 'threshold': 0.1, 'drifted': True},
      'country': {'value': 0.01, 'threshold': 0.1, 'drifted': False},
      'channel': {'value': 0.5, 'threshold': 0.1, 'drifted': True}}}))
  assert monitor.main(_argv(inputs, out, model)) == 0
  written = json.loads((out / 'monitoring' / 'report.json').read_text())
  important = written['important_features']
  assert important['drifted'] == ['amount']
  assert [f['feature'] for f in important['features']][:2] == [
      'amount', 'country']
  assert len(important['features']) == 10
  assert important['features'][0]['skew'] is None   # no skew.json
