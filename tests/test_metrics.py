"""metrics.prom: parsed with prometheus_client's parser, equal to the run
summary; the health score; the streaming job's endpoint."""

import socket
import urllib.request

import apache_beam as beam
import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines import streaming
from pipelines.synthetic import transactions as generate
from pipelines.outputs import metrics
from pipelines.outputs.summary import counters
from transforms.common import CountRows
from transforms.parse import NAMESPACE

RUNS = ('features_only', 'full', 'drifted', 'stopped')


def _samples(text):
  """{(sample name, frozenset(labels)): value} of an exposition text."""
  return {(s.name, frozenset(s.labels.items())): s.value
          for family in text_string_to_metric_families(text)
          for s in family.samples}


def _value(samples, name, **labels):
  return samples[(name, frozenset(labels.items()))]


@pytest.mark.parametrize('name', RUNS)
def test_metrics_file_equals_the_run_summary(report_runs, name):
  out = getattr(report_runs, name)
  summary = report_runs.summary[name]
  samples = _samples((out / 'metrics.prom').read_text())
  assert _value(samples, 'mlpipe_records_read_total') == \
      summary['records_read']
  assert _value(samples, 'mlpipe_records_valid_total') == \
      summary['records_valid']
  dead = {dict(labels)['kind']: v for (n, labels), v in samples.items()
          if n == 'mlpipe_records_dead_lettered_total'}
  assert dead == summary['dead_letter_by_kind']
  assert sum(dead.values()) == summary['records_dead_lettered']
  assert _value(samples, 'mlpipe_feature_rows_total') == \
      summary['feature_rows']
  for key, count in summary['aggregate_rows'].items():
    assert _value(samples, 'mlpipe_aggregate_rows_total', key=key) == count
  for severity, count in summary['validation']['anomalies'].items():
    assert _value(samples, 'mlpipe_anomalies', severity=severity) == count
  stages = {dict(labels)['stage']: v for (n, labels), v in samples.items()
            if n == 'mlpipe_stage_duration_seconds'}
  assert stages == summary['stage_seconds']
  for kind in ('drift', 'skew'):
    distances = {dict(labels)['feature']: v
                 for (n, labels), v in samples.items()
                 if n == 'mlpipe_drift_distance' and
                 dict(labels)['kind'] == kind}
    expected = {f: v for f, v in (summary['validation'][kind] or {}).items()
                if v is not None}
    assert distances == expected
  assert _value(samples, 'mlpipe_health_score') == summary['health']['score']
  assert _value(samples, 'mlpipe_run_info', status=summary['status']) == 1
  if 'model' in summary:
    assert _value(samples, 'mlpipe_predictions_total') == \
        summary['predictions_written']
    for metric, value in summary['model']['metrics']['eval'].items():
      assert value is not None
      assert _value(samples, 'mlpipe_model_metric', split='eval',
                    metric=metric) == value
  else:
    assert not [n for n, _ in samples if n.startswith(
        ('mlpipe_predictions', 'mlpipe_model'))]


def test_health_orders_clean_drifted_stopped(report_runs):
  health = {n: report_runs.summary[n]['health'] for n in RUNS}
  assert (health['full']['score'] > health['drifted']['score'] >
          health['stopped']['score'])
  assert health['drifted']['parts']['drift'] < 1.0
  assert health['full']['parts']['drift'] == 1.0
  assert health['stopped']['completion'] == metrics.STOPPED_FACTOR
  assert 'model' not in health['features_only']['parts']
  for h in health.values():
    assert 0.0 <= h['score'] <= 1.0


def test_health_formula_by_hand():
  summary = {
      'status': 'ok', 'records_read': 1000, 'records_valid': 900,
      'validation': {'anomalies': {'ERROR': 0, 'WARNING': 2, 'INFO': 1},
                     'drift': {'a': 0.2, 'b': 0.01, 'c': None},
                     'drifted': ['a'], 'skew': None, 'skewed': None},
      'model': {'task': 'binary', 'metrics': {'eval': {'roc_auc': 0.9}}}}
  # validity 0.9; anomalies 0.9^2 * 0.99 = 0.8019; drift 1 - 1/2 = 0.5;
  # model (0.9 - 0.5) / 0.5 = 0.8.
  # (0.3*0.9 + 0.3*0.8019 + 0.2*0.5 + 0.2*0.8) / 1.0 = 0.77057
  got = metrics.health(summary)
  assert got['parts'] == {'validity': 0.9, 'anomalies': 0.8019,
                          'drift': 0.5, 'model': 0.8}
  assert got['score'] == 0.7706
  # Stopped by the gate: half; no model part (weights renormalised).
  stopped = dict(summary, status='stopped: ERROR anomalies')
  del stopped['model']
  assert metrics.health(stopped)['score'] == round(
      0.5 * (0.3 * 0.9 + 0.3 * 0.8019 + 0.2 * 0.5) / 0.8, 4)
  assert metrics.health(dict(summary, status='failed'))['score'] == 0.0
  regression = dict(summary, model={'task': 'regression',
                                    'metrics': {'eval': {'r2': -0.3}}})
  assert metrics.health(regression)['parts']['model'] == 0.0


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_streaming_metrics_port_serves_the_final_summary(tmp_path):
  records = generate.generate_transactions(rows=300, users=10, seed=5)
  generate.write_records(records, str(tmp_path / 'tx.jsonl'))
  port = _free_port()
  summary = streaming.run(['--input', str(tmp_path / 'tx.jsonl'),
                           '--output_dir', str(tmp_path / 'out'),
                           '--replay_batch', '100', '--metrics_port',
                           str(port)])
  # The endpoint outlives the job until the process ends: final values.
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics',
                              timeout=30) as response:
    served = _samples(response.read().decode('utf-8'))
  assert _value(served, 'mlpipe_records_read_total') == 300
  assert _value(served, 'mlpipe_records_valid_total') == \
      summary['records_valid'] == 300
  assert _value(served, 'mlpipe_feature_rows_total') == 300
  assert _value(served, 'mlpipe_run_info', status='ok',
                source='final summary') == 1
  written = _samples((tmp_path / 'out' / 'streaming' /
                      'metrics.prom').read_text())
  assert _value(written, 'mlpipe_records_read_total') == 300


def test_live_collector_reads_the_jobs_counters():
  # A finished Beam job's result stands in for a running one: each scrape
  # queries result.metrics(), then update() switches to the final summary.
  p = beam.Pipeline()
  _ = (p | beam.Create([pa.RecordBatch.from_pydict({'x': list(range(7))})])
       | beam.ParDo(CountRows('records_read')))
  result = p.run()
  result.wait_until_finish()
  assert counters(result)['records_read'] == 7
  port = _free_port()
  collector, server = metrics.serve(port, result)
  try:
    assert server.server_address == ('127.0.0.1', port)
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics',
                                timeout=30) as response:
      live = _samples(response.read().decode('utf-8'))
  finally:
    server.shutdown()
    server.server_close()
  assert _value(live, 'mlpipe_records_read_total') == 7
  assert _value(live, 'mlpipe_run_info', status='running',
                source='beam counters') == 1
  collector.update({'status': 'ok', 'records_read': 9})
  final = _samples(metrics.exposition_text_of(collector))
  assert _value(final, 'mlpipe_records_read_total') == 9
  assert NAMESPACE == 'mlpipe'
