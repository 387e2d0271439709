"""A new table is a new declaration: each dataset shape runs end to end.

Small generated tables, nothing downloaded:
  * credit: no id, no entity, no timestamp, a Yes/No label, an optional
    feature imputed with an indicator (CSV);
  * bikes: an int id and an int entity/aggregate key, a timestamp composed
    from a date and an hour in a declared zone, a regression label, history
    features and aggregates of the declared value (JSON lines);
  * survey: multi-class label from a list of classes, no timestamp;
  * survey without its label: the run stops after validation.
"""

import csv
import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import batch
from pipelines.model import training as train
from schemas.dataset import load_dataset
from transforms import inference

CREDIT = """
name: credit
roles: {label: default}
label: {classes: {'No': 0, 'Yes': 1}}
fields:
  limit_bal: {type: float, required: true, min: 0}
  age: {type: int, required: true, min: 18, max: 100}
  education: {type: string, required: true,
              allowed: [graduate, university, high_school, other]}
  bill_amt: {type: float}
  pay_delay: {type: int, required: true, min: -2, max: 9}
  default: {type: string, required: true}
min_examples: 50
transform:
  numeric:
    limit_bal: log_z_score
    age: z_score
    bill_amt: {scale: log_z_score, impute: mean, indicator: true}
    pay_delay: z_score
  categorical:
    education: {oov_buckets: 1}
"""

BIKES = """
name: bikes
roles: {id: instant, entity: station, timestamp: ride_hour, label: cnt}
label: {task: regression}
fields:
  instant: {type: int, required: true, min: 1}
  station: {type: int, required: true}
  dteday: {type: string, required: true}
  hr: {type: int, required: true, min: 0, max: 23}
  ride_hour: {type: timestamp, required: true, from: {date: dteday, hour: hr},
              zone: America/New_York}
  temp: {type: float, required: true}
  weather: {type: string, required: true, allowed: [clear, mist, rain]}
  cnt: {type: int, required: true, min: 0}
history:
  value: cnt
  windows: {3h: 10800, 24h: 86400}
  aggregates: [count, mean]
  calendar: [hour]
aggregates: {keys: [station], window_size: 24h}
transform:
  numeric:
    temp: z_score
    station_mean_3h: z_score
    station_mean_24h: z_score
  bucketize: {event_hour: 6}
  categorical: {weather: {}}
"""

SURVEY = """
name: survey
roles: {id: household, label: risk}
label: {classes: [low, medium, high]}
fields:
  household: {type: string, required: true}
  income: {type: float, required: true, min: 0}
  size: {type: int, required: true, min: 1, max: 12}
  region: {type: string, required: true}
  risk: {type: string, required: false}
transform:
  numeric: {income: log_z_score, size: z_score}
  categorical: {region: {}}
"""


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _parquet(pattern):
  paths = sorted(glob.glob(pattern))
  assert paths, pattern
  return pa.concat_tables([pq.read_table(p) for p in paths])


def _eval_split(out, dataset, metadata, label):
  """(the run's estimator, its eval split's feature matrix and labels),
  rebuilt from the run's outputs as a user would."""
  table = train.read_transformed(f'{out}/transform/transformed')
  _, eval_rows = train.split(table, dataset, 0.2)
  with open(f'{out}/model/model.skops', 'rb') as f:
    estimator = inference.loads_estimator(f.read(), 'model')
  x = inference.feature_matrix({n: eval_rows.column(n)
                                for n in metadata['features']},
                               metadata['features'])
  return estimator, x, eval_rows.column(label).to_numpy()


def _run(tmp_path, schema, data, *flags):
  out = tmp_path / 'out'
  summary = batch.run(['--schema', schema, '--input', data, '--output_dir',
                       str(out), '--runner', 'DirectRunner', *flags])
  return summary, str(out)


# Credit: no id, no time, Yes/No label, an optional feature ------------------
@pytest.fixture(scope='module')
def credit_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('credit')
  rng = np.random.default_rng(3)
  n = 400
  limit = rng.lognormal(10, 0.5, n).round(2)
  delay = rng.integers(-2, 10, n)
  risk = 1 / (1 + np.exp(-(delay - 2.5)))
  default = np.where(rng.random(n) < risk, 'Yes', 'No')
  with open(tmp / 'credit.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['limit_bal', 'age', 'education', 'bill_amt', 'pay_delay',
                'default'])
    for i in range(n):
      bill = '' if i % 7 == 0 else f'{limit[i] * rng.random():.2f}'
      w.writerow([limit[i], int(rng.integers(21, 70)),
                  ['graduate', 'university', 'high_school', 'other'][i % 4],
                  bill, int(delay[i]), default[i]])
    w.writerow([1000, 30, 'graduate', '', 0, 'Maybe'])   # not a class
  schema = _write(tmp, 'credit.yaml', CREDIT)
  summary, out = _run(tmp, schema, str(tmp / 'credit.csv'))
  return summary, out, n


def test_credit_runs_from_its_declaration(credit_run):
  summary, out, n = credit_run
  assert summary['status'] == 'ok'
  assert summary['records_read'] == n + 1
  assert summary['records_valid'] == n
  assert summary['dead_letter_by_kind'] == {'not_allowed': 1}
  predictions = _parquet(f'{out}/predictions/*.parquet')
  assert predictions.num_rows == n
  # No id declared: records are named by file and position.
  assert sorted(predictions.column('record_id').to_pylist())[:2] == [
      'credit.csv:0', 'credit.csv:1']
  model = summary['model']
  assert model['split'].startswith('stratified random by class')
  assert model['metrics']['eval']['roc_auc'] > 0.7


def test_credit_split_is_stratified_and_the_label_mapped(credit_run):
  _, out, n = credit_run
  metadata = inference.read_metadata(f'{out}/model')
  assert metadata['classes'] == ['No', 'Yes']
  transformed = train.read_transformed(f'{out}/transform/transformed')
  labels = transformed.column('default').to_numpy()
  assert set(labels) == {0, 1}
  ev = metadata['metrics']['eval']
  positives = int(labels.sum())
  # Each class keeps its share in the eval split (rounding per class).
  assert ev['positives'] == round(positives * 0.2)
  assert ev['rows'] == round(positives * 0.2) + round((n - positives) * 0.2)
  # The missing bill amounts were imputed, and the indicator kept them.
  assert 'bill_amt_missing_xf' in transformed.column_names
  assert transformed.column('bill_amt_missing_xf').to_numpy().sum() == len(
      range(0, n, 7))
  assert transformed.column('bill_amt_xf').null_count == 0


# Bikes: int ids and keys, composed local timestamps, regression ------------
@pytest.fixture(scope='module')
def bikes_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('bikes')
  rng = np.random.default_rng(5)
  rows, instant = [], 1
  for day in range(1, 15):
    for hr in range(24):
      for station in (7, 11):
        temp = 10 + 8 * np.sin(hr / 24 * 2 * np.pi) + rng.normal()
        cnt = int(max(0, 20 + 3 * temp + 15 * (7 <= hr <= 19) +
                      rng.normal(0, 4)))
        rows.append({'instant': instant, 'station': station,
                     'dteday': f'2011-03-{day:02d}', 'hr': hr,
                     'temp': round(float(temp), 2),
                     'weather': ['clear', 'mist', 'rain'][hr % 3],
                     'cnt': cnt})
        instant += 1
  with open(tmp / 'bikes.jsonl', 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  schema = _write(tmp, 'bikes.yaml', BIKES)
  summary, out = _run(tmp, schema, str(tmp / 'bikes.jsonl'))
  return summary, out, rows


def test_bikes_timestamp_from_date_hour_and_zone(bikes_run):
  summary, out, rows = bikes_run
  # 2011-03-13 02:00 does not exist in New York (DST): dead-lettered.
  assert summary['dead_letter_by_kind'] == {'type_error': 2}
  assert summary['records_valid'] == len(rows) - 2
  features = _parquet(f'{out}/features/*.parquet').sort_by('instant')
  first = features.slice(0, 1).to_pylist()[0]
  # 2011-03-01 00:00 EST is 05:00 UTC.
  assert str(first['ride_hour']) == '2011-03-01 05:00:00+00:00'
  assert first['event_hour'] == 5


def test_bikes_ids_and_keys_keep_their_int_type(bikes_run):
  _, out, _ = bikes_run
  assert _parquet(f'{out}/features/*.parquet').schema.field(
      'instant').type == pa.int64()
  aggregates = _parquet(f'{out}/aggregates/station/*.parquet')
  assert aggregates.schema.field('station').type == pa.int64()
  assert {'total_cnt', 'mean_cnt'} <= set(aggregates.column_names)
  assert 'is_fraud_rate' not in aggregates.column_names
  predictions = _parquet(f'{out}/predictions/*.parquet')
  assert predictions.schema.field('instant').type == pa.int64()
  assert predictions.column_names == ['instant', 'prediction', 'split',
                                      'model_version', 'scored_at']


def test_bikes_history_of_the_declared_value(bikes_run):
  _, out, _ = bikes_run
  features = _parquet(f'{out}/features/*.parquet').to_pandas()
  station = features[features.station == 7].sort_values('ride_hour')
  # The 3h mean of cnt: the station's three previous hourly counts.
  cnt = station.cnt.to_numpy().astype(float)
  times = station.ride_hour.astype('int64').to_numpy()
  for i in (10, 50, 100):
    window = (times >= times[i] - 3 * 3600 * 10**9) & (times < times[i])
    assert station.station_mean_3h.iloc[i] == pytest.approx(
        cnt[window].mean())


def test_regression_metrics_equal_scikit_learns(bikes_run):
  from sklearn.metrics import (mean_absolute_error, mean_squared_error,
                               r2_score)
  summary, out, _ = bikes_run
  dataset = load_dataset(str(glob.glob(f'{os.path.dirname(out)}/*.yaml')[0]))
  metadata = inference.read_metadata(f'{out}/model')
  assert metadata['task'] == 'regression'
  estimator, x, y = _eval_split(out, dataset, metadata, 'cnt')
  predicted = estimator.predict(x)
  ev = metadata['metrics']['eval']
  assert ev['rmse'] == pytest.approx(
      np.sqrt(mean_squared_error(y, predicted)))
  assert ev['mae'] == pytest.approx(mean_absolute_error(y, predicted))
  assert ev['r2'] == pytest.approx(r2_score(y, predicted))
  assert ev['r2'] > 0.5
  assert summary['model']['metrics']['eval']['rmse'] == ev['rmse']


# Survey: multi-class; and without a label -----------------------------------
def _survey_rows(n, seed):
  rng = np.random.default_rng(seed)
  income = rng.lognormal(10, 0.6, n)
  size = rng.integers(1, 9, n)
  pressure = np.log(income) - 0.3 * size + rng.normal(0, 0.3, n)
  risk = np.where(pressure > 9.3, 'low', np.where(pressure > 8.6, 'medium',
                                                  'high'))
  return [{'household': f'h{i:05d}', 'income': round(float(income[i]), 2),
           'size': int(size[i]), 'region': ['north', 'south', 'east'][i % 3],
           'risk': str(risk[i])} for i in range(n)]


@pytest.fixture(scope='module')
def survey_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('survey')
  with open(tmp / 'survey.jsonl', 'w') as f:
    for row in _survey_rows(450, 11):
      f.write(json.dumps(row) + '\n')
  schema = _write(tmp, 'survey.yaml', SURVEY)
  summary, out = _run(tmp, schema, str(tmp / 'survey.jsonl'),
                      '--model_type', 'logreg')
  return summary, out, schema


def test_multiclass_predictions_and_metrics_equal_scikit_learns(survey_run):
  from sklearn.metrics import log_loss, roc_auc_score
  summary, out, schema = survey_run
  dataset = load_dataset(schema)
  metadata = inference.read_metadata(f'{out}/model')
  assert metadata['task'] == 'multiclass'
  assert metadata['classes'] == ['low', 'medium', 'high']
  estimator, x, y = _eval_split(out, dataset, metadata, 'risk')
  proba = estimator.predict_proba(x)
  ev = metadata['metrics']['eval']
  assert ev['roc_auc'] == pytest.approx(roc_auc_score(
      y, proba, multi_class='ovr', average='macro'))
  assert ev['log_loss'] == pytest.approx(log_loss(y, proba))
  assert ev['roc_auc'] > 0.8
  predictions = _parquet(f'{out}/predictions/*.parquet')
  assert predictions.num_rows == summary['records_valid']
  assert predictions.column_names == ['household', 'score', 'predicted_label',
                                      'predicted_class', 'split',
                                      'model_version', 'scored_at']
  names = np.array(metadata['classes'])
  index = predictions.column('predicted_label').to_numpy()
  assert (names[index] == np.array(predictions.column(
      'predicted_class').to_pylist())).all()


def test_without_a_label_the_run_stops_after_validation(tmp_path, capsys):
  with open(tmp_path / 'survey.jsonl', 'w') as f:
    for row in _survey_rows(120, 2):
      row.pop('risk')
      f.write(json.dumps(row) + '\n')
  declaration = SURVEY.replace('roles: {id: household, label: risk}',
                               'roles: {id: household}').replace(
                                   'label: {classes: [low, medium, high]}',
                                   '')
  schema = _write(tmp_path, 'unlabelled.yaml', declaration)
  code = batch.main(['--schema', schema, '--input',
                     str(tmp_path / 'survey.jsonl'), '--output_dir',
                     str(tmp_path / 'out')])
  assert code == 0
  err = capsys.readouterr().err
  assert 'No label declared in survey: the run stops after statistics and ' \
         'validation' in err
  out = tmp_path / 'out'
  summary = json.loads((out / 'run_summary.json').read_text())
  assert summary['stopped_after'] == 'validation: no label declared'
  assert (out / 'validation' / '_SUCCESS').exists()
  assert not glob.glob(f'{out}/model/*')
  assert not glob.glob(f'{out}/predictions/*')


@pytest.mark.parametrize('change,message', [
    (lambda t: t.replace("{'No': 0, 'Yes': 1}", '{No: 0, Yes: 1}'),
     "label.classes.False: is how YAML reads an unquoted Yes/No/on/off; "
     "quote the class: 'Yes': 1"),
    (lambda t: t.replace('roles: {label: default}',
                         'roles: {label: default, timestamp: age}'),
     'roles.timestamp: age has type int; give that field type: timestamp'),
    (lambda t: t.replace('education: {oov_buckets: 1}',
                         'eduction: {oov_buckets: 1}'),
     "transform.categorical.eduction: 'eduction' is not a field or history "
     'feature'),
    (lambda t: t.replace('bill_amt: {scale: log_z_score, impute: mean, '
                         'indicator: true}', 'bill_amt: log_z_score'),
     'transform.numeric.bill_amt: bill_amt is optional and may be missing'),
    (lambda t: t + 'history: {windows: {1h: 3600}}\n',
     'history: history needs roles.timestamp'),
    # A field named like a column the pipeline adds (failed the run after
    # training with "Field score exists 2 times", exit 3).
    (lambda t: t.replace('  bill_amt: {type: float}',
                         '  bill_amt: {type: float}\n  score: {type: float}'),
     'fields.score: the name is a column the pipeline adds to the '
     'predictions; rename the field'),
    # YAML itself: a key twice, aliases that expand to 9**9 values.
    (lambda t: t.replace('  pay_delay:', '  age: {type: float}\n  pay_delay:'),
     "line 11: key 'age' is given twice (first on line 7); give each key "
     'once'),
    (lambda t: t.replace('[graduate, university, high_school, other]',
                         '[&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], '
                         + ', '.join(f'&a{i} [' + ', '.join([f'*a{i - 1}'] * 9)
                                     + ']' for i in range(1, 9)) + ']'),
     'aliases expand to over 10000 more values; write the values out once'),
])
def test_broken_declarations_exit_2_with_one_line(tmp_path, capsys, change,
                                                  message):
  schema = _write(tmp_path, 'credit.yaml', change(CREDIT))
  data = tmp_path / 'credit.csv'
  data.write_text('limit_bal,age,education,bill_amt,pay_delay,default\n')
  code = batch.main(['--schema', schema, '--input', str(data),
                     '--output_dir', str(tmp_path / 'out')])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err == f'error: credit.yaml: {message}' or (
      err.startswith(f'error: credit.yaml: {message}') and '\n' not in err)
