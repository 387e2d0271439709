"""End to end: pipelines.batch on the committed sample, then scoring only."""

import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from pipelines import batch
from pipelines.synthetic import transactions as generate
from pipelines.cli.options import DEFAULT_INPUT


def _rows(pattern):
  return [row for path in sorted(glob.glob(pattern))
          for row in pq.read_table(path).to_pylist()]


def _json_lines(pattern):
  return [json.loads(line) for path in sorted(glob.glob(pattern))
          for line in open(path, encoding='utf-8')]


@pytest.fixture(scope='module')
def sample_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('batch')
  summary = batch.run(['--output_dir', str(out), '--runner', 'DirectRunner'])
  return out, summary


def test_every_record_is_accounted_for(sample_run):
  out, summary = sample_run
  with open(DEFAULT_INPUT, encoding='utf-8') as f:
    lines = [line for line in f if line.strip()]
  silver = _rows(f'{out}/silver/*.parquet')
  dead = _json_lines(f'{out}/dead_letter/*.jsonl')
  assert summary['records_read'] == len(lines)
  assert summary['records_valid'] == len(silver)
  assert summary['records_dead_lettered'] == len(dead)
  assert summary['records_read'] == len(silver) + len(dead)
  assert summary['records_accounted_for'] is True
  # Each input line is either a valid record or a dead-letter row, once.
  positions = {r['position'] for r in dead}
  assert len(positions) == len(dead)
  assert len(dead) == sum(summary['dead_letter_by_kind'].values())
  on_disk = json.load(open(out / 'run_summary.json'))
  assert on_disk['records_read'] == summary['records_read']


def test_each_broken_kind_of_the_sample_reaches_the_dead_letter(sample_run):
  out, summary = sample_run
  kinds = {r['error_kind'] for r in _json_lines(f'{out}/dead_letter/*.jsonl')}
  # The sample is generated with one or more broken records of each kind.
  assert kinds == set(generate.broken_kinds('jsonl'))
  assert set(summary['dead_letter_by_kind']) == kinds


def test_features_aggregates_and_predictions(sample_run):
  out, summary = sample_run
  features = _rows(f'{out}/features/*.parquet')
  assert summary['feature_rows'] == len(features) == summary['records_valid']
  for key, count in summary['aggregate_rows'].items():
    assert count == len(_rows(f'{out}/aggregates/{key}/*.parquet')) > 0
  predictions = _json_lines(f'{out}/predictions/*.jsonl')
  assert summary['predictions_written'] == len(predictions) == len(features)
  assert summary['feature_rows_scored'] == len(features)
  assert ({p['transaction_id'] for p in predictions} ==
          {f['transaction_id'] for f in features})
  assert {p['model_version'] for p in predictions} == {
      summary['model']['version']}
  assert len(_rows(f'{out}/predictions/*.parquet')) == len(predictions)
  assert summary['model']['metrics']['eval']['roc_auc'] > 0.9


def test_scoring_with_an_existing_model_does_not_retrain(sample_run, tmp_path):
  out, summary = sample_run
  new_input = tmp_path / 'new.jsonl'
  generate.write_records(
      generate.generate_transactions(rows=600, users=20, seed=99,
                                     start='2026-10-01T00:00:00Z', days=3),
      str(new_input))
  scored = batch.run(['--input', str(new_input), '--output_dir',
                      str(tmp_path / 'out'), '--model_dir',
                      str(out / 'model')])
  assert scored['model']['trained_in_this_run'] is False
  assert scored['model']['version'] == summary['model']['version']
  assert not os.path.exists(tmp_path / 'out' / 'model')
  predictions = _json_lines(f'{tmp_path}/out/predictions/*.jsonl')
  assert len(predictions) == scored['feature_rows'] == 600


def test_tampered_model_is_refused_with_exit_2(sample_run, tmp_path, capsys):
  out, _ = sample_run
  model = tmp_path / 'model'
  for path in glob.glob(f'{out}/model/**', recursive=True):
    target = model / os.path.relpath(path, out / 'model')
    if os.path.isdir(path):
      target.mkdir(parents=True, exist_ok=True)
    else:
      target.write_bytes(open(path, 'rb').read())
  with open(model / 'model.skops', 'ab') as f:
    f.write(b'tampered')
  code = batch.main(['--output_dir', str(tmp_path / 'out'),
                     '--model_dir', str(model)])
  assert code == 2
  assert 'model.skops' in capsys.readouterr().err


@pytest.mark.parametrize('argv,message', [
    (['--input', '/nonexistent/*.jsonl'], 'matched no files'),
    (['--schema', '/nonexistent.yaml'], 'cannot read schema'),
    (['--reference_time', 'yesterday'], '--reference_time'),
    (['--window_size', '24h', '--window_period', '7h'], 'must divide'),
])
def test_bad_flags_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
  assert batch.main(argv + ['--output_dir', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]


def test_error_anomaly_stops_the_run_before_transform(tmp_path, capsys):
  small = tmp_path / 'small.jsonl'
  # Fewer valid records than the declaration's min_examples (100).
  generate.write_records(generate.generate_transactions(
      rows=40, users=5, seed=3, days=2), str(small))
  out = tmp_path / 'out'
  assert batch.main(['--input', str(small), '--output_dir', str(out)]) == 1
  assert 'data validation failed' in capsys.readouterr().err
  summary = json.load(open(out / 'run_summary.json'))
  assert summary['status'].startswith('stopped')
  assert summary['validation']['errors'] == ['*dataset*']
  anomalies = json.load(open(out / 'validation' / 'anomalies.json'))
  assert [(a['type'], a['severity']) for a in anomalies['anomalies']] == [
      ('DATASET_LOW_NUM_EXAMPLES', 'ERROR')]
  assert (out / 'validation' / 'stats.html').exists()
  for downstream in ('transform', 'model', 'predictions'):
    assert not (out / downstream).exists()


def test_no_fail_on_anomalies_reports_and_continues(sample_run, tmp_path):
  out, _ = sample_run
  small = tmp_path / 'small.jsonl'
  generate.write_records(generate.generate_transactions(
      rows=40, users=5, seed=3, days=2), str(small))
  # 40 rows are too few to train on: score them with the sample's model.
  summary = batch.run(['--input', str(small), '--output_dir',
                       str(tmp_path / 'o'), '--no-fail_on_anomalies',
                       '--model_dir', str(out / 'model')])
  assert summary['status'] == 'ok'
  assert summary['validation']['errors'] == ['*dataset*']
  assert summary['predictions_written'] == 40


def test_drift_against_a_baseline_is_reported(sample_run, tmp_path):
  out, _ = sample_run
  shifted = tmp_path / 'shifted.jsonl'
  records = generate.generate_transactions(rows=3000, users=50, seed=5)
  for r in records:
    if r['channel'] != 'refund':
      r['amount'] = round(r['amount'] * 5, 2)
  generate.write_records(records, str(shifted))
  summary = batch.run(['--input', str(shifted), '--output_dir',
                       str(tmp_path / 'o'), '--model_dir', str(out / 'model'),
                       '--baseline_stats',
                       str(out / 'statistics' / 'stats.pb')])
  assert 'amount' in summary['validation']['drifted']
  assert summary['validation']['drift']['amount'] > 0.1
  drift = json.load(open(tmp_path / 'o' / 'validation' / 'drift.json'))
  assert set(drift['features']) >= {'amount', 'country', 'channel'}


def test_model_quality_on_data_from_another_seed(sample_run, tmp_path):
  """The sample's model (generator seed 7) on data from seed 2."""
  from sklearn.metrics import roc_auc_score
  out, _ = sample_run
  records = generate.generate_transactions(rows=6000, users=100, seed=2,
                                           start='2026-10-01T00:00:00Z',
                                           days=10)
  path = tmp_path / 'seed2.jsonl'
  generate.write_records(records, str(path))
  batch.run(['--input', str(path), '--output_dir', str(tmp_path / 'o'),
             '--model_dir', str(out / 'model')])
  labels = {r['transaction_id']: r['is_fraud'] for r in records}
  predictions = _json_lines(f'{tmp_path}/o/predictions/*.jsonl')
  assert sum(labels.values()) >= 50  # enough positives for a stable AUC
  auc = roc_auc_score([labels[p['transaction_id']] for p in predictions],
                      [p['score'] for p in predictions])
  assert auc >= 0.95, auc


def test_reruns_give_the_same_model_version_and_predictions(tmp_path):
  """Same input and flags, two full runs: identical outputs."""
  path = tmp_path / 'in.jsonl'
  generate.write_records(generate.generate_transactions(
      rows=1500, users=30, seed=4, days=5), str(path))
  runs = []
  for name in ('first', 'second'):
    out = tmp_path / name
    summary = batch.run(['--input', str(path), '--output_dir', str(out)])
    files = sorted(glob.glob(f'{out}/predictions/*.jsonl'))
    runs.append((summary['model']['version'],
                 b''.join(open(f, 'rb').read() for f in files),
                 _rows(f'{out}/features/*.parquet')))
  assert runs[0][0] == runs[1][0]
  assert runs[0][1] and runs[0][1] == runs[1][1]
  assert runs[0][2] == runs[1][2]
