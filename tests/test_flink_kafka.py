"""Kafka in and out on Flink, and the setups that cannot work.

  * Flink and Kafka runs that cannot work stop before any job starts: one
    line, exit code 2 (pipelines.cli.preflight.check_services, check_kafka);
  * the streaming job reads generated events and two broken messages from a
    Kafka topic on the local Flink session cluster (tests/services.py) at
    parallelism 2, and writes feature rows and aggregate windows equal to
    batch's, one prediction per valid event (RunInference) with the batch
    scorer's score and model version, and dead-letter rows to Kafka topics;
  * an unbounded job with --registry follows a promotion without a restart
    and stops with a `stopped` summary;
  * with checkpoints, a TaskManager killed mid-stream costs no event.
"""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import apache_beam as beam
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.runners.runner import PipelineState
from apache_beam.testing.test_pipeline import TestPipeline
import pyarrow as pa
import pytest

from pipelines import batch, streaming
from pipelines.model import training as train_lib
from pipelines.model.registry import Registry
from transforms.kafka import ReadKafkaRecords
from pipelines.cli.options import StreamingOptions, aggregate_window, flags
from pipelines.synthetic.transactions import generate_transactions, write_records
from schemas.dataset import load_dataset
from tests.services import consume_all, create_topic, flink_flags, \
    produce_file, produce_values, run_script
from tests.test_runners import input_file  # noqa: F401  (fixture)
from transforms.aggregates import EntityAggregates
from transforms.history_features import history_table
from transforms.inference import (TransformedSklearnModelHandler,
                                  predict_table)
from transforms.parse import RecordValidator
from transforms.read import read_file

pytest_plugins = ['tests.services']
DATASET = load_dataset('transactions')


def _free_port() -> int:
  """A port nothing listens on (bound, then released)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def launcher(tmp_path):
  """A launcher jar like runners/fetch_jars.sh's, whose Class-Path names a
  jar that is there."""
  (tmp_path / 'beam').mkdir()
  (tmp_path / 'beam' / 'a.jar').write_bytes(b'')
  jar = tmp_path / 'launcher.jar'
  with zipfile.ZipFile(jar, 'w') as z:
    z.writestr('META-INF/MANIFEST.MF', 'Manifest-Version: 1.0\n'
               'Main-Class: x.Main\nClass-Path: beam/a.jar\n')
  return str(jar)


def _one_error_line(capsys) -> str:
  err = [l for l in capsys.readouterr().err.splitlines()
         if l.startswith('error:')]
  assert len(err) == 1, err
  return err[0]


def _flink(master, jar):
  return ['--runner', 'FlinkRunner', '--flink_master', master,
          '--environment_type', 'LOOPBACK', '--flink_job_server_jar', jar]


def test_batch_refuses_a_flink_cluster_that_is_not_up(input_file, launcher,
                                                      tmp_path, capsys):
  master = f'localhost:{_free_port()}'
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), *_flink(master, launcher)])
  assert code == 2
  line = _one_error_line(capsys)
  assert f'--flink_master {master}: no Flink REST endpoint answers' in line
  assert 'runners/flink_cluster.sh start' in line
  assert not (tmp_path / 'out').exists()


def test_batch_refuses_external_workers_without_a_pool(input_file, launcher,
                                                       tmp_path, capsys):
  pool = f'127.0.0.1:{_free_port()}'
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), '--runner', 'FlinkRunner',
                     '--flink_master', '[local]', '--flink_job_server_jar',
                     launcher, '--environment_type', 'EXTERNAL',
                     '--environment_config', pool])
  assert code == 2
  line = _one_error_line(capsys)
  assert f'--environment_config {pool}: no worker pool answers' in line
  assert 'runners/worker_pool.sh start' in line
  assert not (tmp_path / 'out').exists()


def test_batch_refuses_a_missing_job_server_jar(input_file, tmp_path, capsys):
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), '--runner', 'FlinkRunner',
                     '--flink_master', '[local]'])
  assert code == 2
  assert 'FlinkRunner needs --flink_job_server_jar' in _one_error_line(capsys)


def test_batch_refuses_a_launcher_whose_jars_are_gone(input_file, launcher,
                                                      tmp_path, capsys):
  (tmp_path / 'beam' / 'a.jar').unlink()
  code = batch.main(['--input', input_file, '--output_dir',
                     str(tmp_path / 'out'), *_flink('[local]', launcher)])
  assert code == 2
  assert 'names beam/a.jar, which does not exist' in _one_error_line(capsys)


def _kafka(tmp_path, launcher, servers, **extra):
  flags = ['--output_dir', str(tmp_path / 'out'), *_flink('[local]',
                                                         launcher),
           '--bootstrap_servers', servers, '--input_topic', 'tx']
  for key, value in extra.items():
    flags += [f'--{key}', value]
  return flags


def test_streaming_refuses_a_broker_that_does_not_answer(tmp_path, launcher,
                                                         capsys):
  servers = f'127.0.0.1:{_free_port()}'
  assert streaming.main(_kafka(tmp_path, launcher, servers)) == 2
  line = _one_error_line(capsys)
  assert f'--bootstrap_servers {servers}: no Kafka broker answers' in line


def test_streaming_refuses_kafka_on_the_direct_runner(tmp_path, launcher,
                                                      capsys):
  argv = ['--output_dir', str(tmp_path / 'out'), '--bootstrap_servers',
          '127.0.0.1:9092', '--input_topic', 'tx']
  assert streaming.main(argv) == 2
  assert '--bootstrap_servers streams on FlinkRunner' in _one_error_line(capsys)


class _Job:
  """A PipelineResult stand-in: wait_until_finish raises `raises`."""

  def __init__(self, raises=None, state=PipelineState.DONE):
    self.raises, self.state, self.cancelled = raises, state, False

  def wait_until_finish(self):
    if self.raises:
      raise self.raises
    return self.state

  def cancel(self):
    self.cancelled = True


def test_wait_or_stop_cancels_the_job_on_ctrl_c_or_sigterm():
  job = _Job(KeyboardInterrupt())
  assert streaming.wait_or_stop(job) == 'stopped'
  assert job.cancelled


def test_wait_or_stop_reports_a_job_cancelled_on_the_runner_as_stopped():
  # Beam's portable result raises for any end but DONE.
  job = _Job(RuntimeError('Pipeline x failed in state CANCELLED'),
             PipelineState.CANCELLED)
  assert streaming.wait_or_stop(job) == 'stopped'
  failed = _Job(RuntimeError('boom'), PipelineState.FAILED)
  with pytest.raises(RuntimeError, match='boom'):
    streaming.wait_or_stop(failed)
  assert streaming.wait_or_stop(_Job()) == 'ok'


class _InterruptedStream(_Job):
  """What the portable runner's wait does when a signal lands while gRPC
  reads the job-state stream: gRPC cancels the stream and raises the RPC
  error, not KeyboardInterrupt."""

  def wait_until_finish(self):
    import grpc  # pylint: disable=import-outside-toplevel
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(10)
    except KeyboardInterrupt:
      raise grpc.RpcError('Locally cancelled by application!') from None
    return self.state


def test_wait_or_stop_stops_when_the_signal_cancels_the_state_stream():
  job = _InterruptedStream()
  assert streaming.wait_or_stop(job) == 'stopped'
  assert job.cancelled


# Kafka in, Kafka out, on the local Flink session cluster ----------------------
# Events of the project's generator, produced to a topic in event-time order
# keyed by user, plus two messages that are not records.
N_EVENTS, N_USERS = 300, 20
NOT_RECORDS = [b'{not json', b'\xff\xfe not UTF-8']


@pytest.fixture(scope='module')
def kafka_stream(flink_cluster, kafka_broker, trained, tmp_path_factory):
  """Produces the events, runs the streaming job on Flink until it read
  every message (--max_num_records), and returns what it wrote."""
  root = tmp_path_factory.mktemp('kafka-stream')
  path = root / 'tx.jsonl'
  write_records(generate_transactions(N_EVENTS, N_USERS, seed=3, days=7),
                str(path), 'jsonl')
  sent = produce_file(kafka_broker, 'transactions', [str(path)], DATASET)
  sent += produce_values(kafka_broker, 'transactions', NOT_RECORDS)
  out = root / 'out'
  # Parallelism 2: the by-id dedupe shuffle hands an entity's events to
  # the history and aggregate steps out of order; both must not care.
  code = streaming.main([
      *flink_flags(flink_cluster, parallelism=2),
      '--bootstrap_servers', kafka_broker, '--input_topic', 'transactions',
      '--output_topic', 'predictions', '--dead_letter_topic', 'dead_letter',
      '--max_num_records', str(sent), '--model_dir', trained['model_dir'],
      '--output_dir', str(out)])
  assert code == 0
  raws = [raw for raw in read_file(str(path), DATASET)]
  records = [RecordValidator(DATASET).validate(raw) for raw in raws]
  return {'records': records, 'sent': sent,
          'features': _json_rows(out / 'streaming' / 'features'),
          'aggregates': {key: _json_rows(out / 'streaming' / 'aggregates' / key)
                         for key in DATASET.aggregate_keys},
          'predictions': consume_all(kafka_broker, 'predictions', N_EVENTS),
          'dead_letter': consume_all(kafka_broker, 'dead_letter',
                                     len(NOT_RECORDS), timeout_s=10)}


def _json_rows(folder):
  return [json.loads(line) for path in sorted(folder.glob('*.jsonl'))
          for line in path.read_text(encoding='utf-8').splitlines()]


def test_kafka_on_flink_features_equal_batch_features_row_for_row(
    kafka_stream):
  # The batch definition (transforms.history_features.history_table, what
  # HistoryFeatures computes per shard) over the same records.
  table = pa.Table.from_pylist(kafka_stream['records'],
                               schema=DATASET.batch_schema())
  expected = history_table(table, DATASET).to_pylist()
  key = lambda row: row['transaction_id']
  got = sorted(kafka_stream['features'], key=key)
  assert len(got) == N_EVENTS
  assert got == sorted(expected, key=key)


def test_kafka_on_flink_scores_every_valid_event_once(kafka_stream):
  ids = collections.Counter(json.loads(v)['transaction_id']
                            for v in kafka_stream['predictions'])
  assert ids == collections.Counter(
      r['transaction_id'] for r in kafka_stream['records'])
  assert set(ids.values()) == {1}


def test_kafka_on_flink_scores_equal_batch_scores(kafka_stream, trained):
  # The batch job's scorer (ScoreBatches -> TransformedSklearnModelHandler
  # -> predict_table) on the batch features of the same records, in
  # process: score, label and model version of every event.
  table = pa.Table.from_pylist(kafka_stream['records'],
                               schema=DATASET.batch_schema())
  model = TransformedSklearnModelHandler(
      trained['model_dir'], id_field=DATASET.id_field).load_model()
  expected = {row['transaction_id']: row for row in predict_table(
      model, history_table(table, DATASET), DATASET.id_field).to_pylist()}
  got = {row['transaction_id']: row
         for row in map(json.loads, kafka_stream['predictions'])}
  assert set(got) == set(expected) and len(got) == N_EVENTS
  version = trained['metadata']['model_version']
  for key, row in got.items():
    want = expected[key]
    assert row['score'] == pytest.approx(want['score'], abs=1e-9), key
    assert row['predicted_label'] == want['predicted_label'], key
    assert row['model_version'] == want['model_version'] == version, key
  # Not all one score: a constant would pass the comparison by luck.
  assert len({round(r['score'], 6) for r in got.values()}) > 10


def test_kafka_on_flink_features_on_arrival_equal_batch_features(
    flink_cluster, kafka_broker, tmp_path):
  """--history_features on_arrival at parallelism 2: no wait for the
  watermark, and still batch's row for every event, because producers key
  by user (a user's events stay in order on one partition) and the dedupe
  is then sharded by user, so no shuffle reorders them. (Sharded by id, as
  with on_watermark, a user's events reach the history step from two
  dedupe workers in either order.)"""
  path = tmp_path / 'tx.jsonl'
  write_records(generate_transactions(N_EVENTS, N_USERS, seed=4, days=2),
                str(path), 'jsonl')
  sent = produce_file(kafka_broker, 'arrivals', [str(path)], DATASET)
  out = tmp_path / 'out'
  code = streaming.main([
      *flink_flags(flink_cluster, parallelism=2),
      '--bootstrap_servers', kafka_broker, '--input_topic', 'arrivals',
      '--max_num_records', str(sent), '--history_features', 'on_arrival',
      '--output_dir', str(out)])
  assert code == 0
  records = [RecordValidator(DATASET).validate(raw)
             for raw in read_file(str(path), DATASET)]
  expected = history_table(pa.Table.from_pylist(
      records, schema=DATASET.batch_schema()), DATASET).to_pylist()
  key = lambda row: row['transaction_id']
  got = sorted(_json_rows(out / 'streaming' / 'features'), key=key)
  assert len(got) == N_EVENTS
  assert got == sorted(expected, key=key)
  # Two days, 20 users: windows hold several events, so the order counts.
  assert max(row['user_id_count_1h'] for row in got) >= 1


def test_kafka_on_flink_dead_letters_what_is_not_a_record(kafka_stream):
  dead = [json.loads(v) for v in kafka_stream['dead_letter']]
  malformed = [d for d in dead if d['error_kind'] != 'late']
  assert sorted(d['raw'] for d in malformed) == sorted(
      v.decode('utf-8', 'replace') for v in NOT_RECORDS)
  assert {d['error_kind'] for d in malformed} == {'malformed'}
  assert {d['source_file'] for d in malformed} == {'kafka:transactions'}


def _batch_aggregates(records, key, tmp_path):
  """The batch job's aggregate rows (EntityAggregates) of `records`."""
  size, period = aggregate_window(
      flags(PipelineOptions([]), StreamingOptions), DATASET)
  batch = pa.RecordBatch.from_pylist(records, schema=DATASET.batch_schema())
  with TestPipeline() as p:
    _ = (p | beam.Create([batch])
         | EntityAggregates(DATASET, key, size, period)
         | beam.FlatMap(lambda b: b.to_pylist())
         | beam.Map(json.dumps, sort_keys=True)
         | beam.io.WriteToText(str(tmp_path / key)))
  return [json.loads(line) for path in sorted(tmp_path.glob(f'{key}*'))
          for line in path.read_text(encoding='utf-8').splitlines()]


def test_kafka_on_flink_aggregates_equal_batch_aggregates(kafka_stream,
                                                          tmp_path):
  dead = [json.loads(v) for v in kafka_stream['dead_letter']]
  assert [d for d in dead if d['error_kind'] == 'late'] == []
  for key in DATASET.aggregate_keys:
    # Each window's last pane (panes accumulate) is the batch row.
    final = {}
    for row in kafka_stream['aggregates'][key]:
      at = (row[key], row['window_start'])
      if at not in final or row['pane_index'] > final[at]['pane_index']:
        final[at] = row
    got = sorted(({k: v for k, v in row.items()
                   if k not in ('pane', 'pane_index')}
                  for row in final.values()),
                 key=lambda r: (r[key], r['window_start']))
    expected = sorted(_batch_aggregates(kafka_stream['records'], key,
                                        tmp_path),
                      key=lambda r: (r[key], r['window_start']))
    assert len(got) == len(expected) > 0
    assert got == expected


# A bounded read over uneven partitions --------------------------------------
# From 10,000 records on, KafkaIO's own limit is split evenly over the
# partitions (5,006 each here): partition 1 holds 3,012, so that read never
# ended, and partition 0 stopped at 5,006 of its 7,000.
UNEVEN = {0: 7000, 1: 3012}


def _produce_to_partitions(bootstrap, topic, counts):
  from kafka import KafkaProducer  # pylint: disable=import-outside-toplevel
  from kafka.admin import KafkaAdminClient, NewTopic  # pylint: disable=import-outside-toplevel
  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  try:
    admin.create_topics([NewTopic(topic, len(counts), 1)])
  finally:
    admin.close()
  producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
  n = 0
  for partition, count in counts.items():
    for _ in range(count):
      producer.send(topic, value=json.dumps({'n': n}).encode(),
                    partition=partition, timestamp_ms=1_000 + n)
      n += 1
  producer.flush()
  producer.close()
  return n


def _write_json(values, path):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(sorted(values), f)


def test_bounded_kafka_read_over_uneven_partitions_ends(flink_cluster,
                                                        kafka_broker,
                                                        tmp_path):
  sent = _produce_to_partitions(kafka_broker, 'uneven', UNEVEN)
  options = PipelineOptions(flink_flags(flink_cluster))
  options.view_as(StandardOptions).streaming = True
  out = str(tmp_path / 'read.json')
  p = beam.Pipeline(options=options)
  _ = (p
       | ReadKafkaRecords(kafka_broker, 'uneven', max_num_records=sent)
       | beam.FlatMap(lambda values: [json.loads(v)['n'] for v in values])
       | beam.combiners.ToList()
       | beam.Map(_write_json, out))
  result = p.run()
  state = result.wait_until_finish(duration=120_000)
  if state != PipelineState.DONE:
    result.cancel()
  assert state == PipelineState.DONE
  with open(out, encoding='utf-8') as f:
    assert json.load(f) == list(range(sent))


# An unbounded job: follows a promotion, stops with a summary ----------------
WATCH_S = 2


def _predictions(bootstrap, topic, expected, timeout_s=300):
  """(id, model_version) of every prediction on `topic`, once `expected`
  came. Returns as soon as they did; the long wait is for a busy machine,
  where the job's start-up alone took over a minute."""
  return [(row['transaction_id'], row['model_version']) for row in
          map(json.loads, consume_all(bootstrap, topic, expected, timeout_s))]


def _produce_events(bootstrap, topic, events, path):
  write_records(events, path, 'jsonl')
  return produce_file(bootstrap, topic, [path], DATASET)


def test_unbounded_kafka_job_follows_a_promotion_and_stops_with_a_summary(
    flink_cluster, kafka_broker, trained, tmp_path):
  """--registry on Flink: an unbounded Kafka read scored by the
  registry's champion, which switches to a promoted model without a
  restart (the registry's pointer files, matched every WATCH_S); SIGINT
  then cancels the job and writes a `stopped` summary of what the files
  hold."""
  registry = Registry(str(tmp_path / 'registry'))
  first = registry.register(trained['model_dir'], 'first')['version']
  second_dir = str(tmp_path / 'second')
  train_lib.train(trained['table'], transform_dir=trained['transform_dir'],
                  model_dir=second_dir, dataset=DATASET, model='logreg',
                  model_version='second-model')
  second = registry.register(second_dir, 'second')['version']
  assert second != first and registry.champion()['version'] == first
  # In event-time order: before the promotion, probes while the job may
  # still score with the old model, and the events after the switch.
  events = generate_transactions(80, 10, seed=5, days=7)
  before, probes, after = events[:20], events[20:60], events[60:]
  create_topic(kafka_broker, 'live')
  create_topic(kafka_broker, 'live_predictions')
  out = tmp_path / 'out'
  job = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.streaming',
       *flink_flags(flink_cluster), '--bootstrap_servers', kafka_broker,
       '--input_topic', 'live', '--output_topic', 'live_predictions',
       '--registry', registry.root, '--model_watch_interval', str(WATCH_S),
       '--file_every', '1s', '--max_bundle_time_mills', '200',
       '--output_dir', str(out)],
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  sent = 0
  try:
    sent += _produce_events(kafka_broker, 'live', before,
                            str(tmp_path / 'before.jsonl'))
    assert set(_predictions(kafka_broker, 'live_predictions', sent)) == {
        (e['transaction_id'], first) for e in before}
    registry.promote(second, 'the test promotes it')
    # Probes, a few events every watch interval, until one is scored by
    # the new champion.
    switched = False
    for i in range(0, len(probes), 4):
      sent += _produce_events(kafka_broker, 'live', probes[i:i + 4],
                              str(tmp_path / f'probe{i}.jsonl'))
      seen = _predictions(kafka_broker, 'live_predictions', sent, 60)
      if any(v == second for _, v in seen):
        switched = True
        break
      time.sleep(WATCH_S)
    assert switched, 'no prediction carried the promoted model'
    time.sleep(2 * WATCH_S)  # every worker's side input has the new pane
    sent += _produce_events(kafka_broker, 'live', after,
                            str(tmp_path / 'after.jsonl'))
    _predictions(kafka_broker, 'live_predictions', sent)
    time.sleep(3)  # --file_every and a bundle: the last rows are in files
    # Everything on the topic, duplicates included (one more than sent
    # never comes: this waits 5 s).
    seen = _predictions(kafka_broker, 'live_predictions', sent + 1, 5)
  finally:
    job.send_signal(signal.SIGINT)
    try:
      _, err = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      job.kill()
      raise
  assert job.returncode == 0, err[-2000:]
  # Every event scored exactly once; the old events kept the old version,
  # the events after the switch carry the new one.
  ids = [i for i, _ in seen]
  assert len(ids) == len(set(ids)) == sent
  versions = dict(seen)
  assert {versions[e['transaction_id']] for e in before} == {first}
  assert {versions[e['transaction_id']] for e in after} == {second}
  assert set(versions.values()) == {first, second}
  # Cancelled on the cluster too, not only in Beam's job server: a job
  # left running keeps both slots and the next job waits forever.
  with urllib.request.urlopen(f'http://{flink_cluster.master}/jobs/overview',
                              timeout=10) as response:
    states = {j['state'] for j in json.load(response)['jobs']}
  assert 'RUNNING' not in states, states
  summary = json.loads((out / 'streaming' / 'run_summary.json').read_text())
  assert summary['status'] == 'stopped'
  assert summary['records_read'] == summary['records_valid'] == sent
  assert summary['predictions_written'] == sent


# A TaskManager crash mid-stream, with checkpoints ----------------------------
CHECKPOINT_MS = 1000


def _rest(cluster, path):
  with urllib.request.urlopen(f'http://{cluster.master}{path}',
                              timeout=10) as response:
    return json.load(response)


def _running_job(cluster):
  jobs = [j['jid'] for j in _rest(cluster, '/jobs/overview')['jobs']
          if j['state'] == 'RUNNING']
  return jobs[0] if len(jobs) == 1 else None


def _wait_for(what, check, timeout_s=300):
  """check()'s first true value, polled every 0.5 s."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = check()
    if value:
      return value
    time.sleep(0.5)
  raise AssertionError(f'timed out waiting for {what}')


def _checkpoint_after(cluster, jid, after_ms):
  """The latest completed checkpoint's id once one triggered after
  `after_ms` (epoch ms) has completed, else None."""
  latest = (_rest(cluster, f'/jobs/{jid}/checkpoints').get('latest') or {}
            ).get('completed')
  if latest and latest['trigger_timestamp'] > after_ms:
    return latest['id']
  return None


def _counts(bootstrap, topic, expected, timeout_s):
  return collections.Counter(
      json.loads(v)['transaction_id']
      for v in consume_all(bootstrap, topic, expected, timeout_s))


def test_taskmanager_crash_restarts_from_the_checkpoint_and_loses_nothing(
    flink_cluster, kafka_broker, trained, tmp_path):
  """--checkpointing_interval on the shared cluster: once a checkpoint
  taken after the first events were scored has completed, more events
  come and the TaskManager is killed (flink_cluster.sh crash-taskmanager,
  which starts a new one). Flink restarts the job from the checkpoint:
  every event gets a prediction, the first ones (before the checkpoint)
  exactly once; the Kafka write is at-least-once, so the events between
  the checkpoint and the crash may be scored twice."""
  events = generate_transactions(150, 15, seed=9, days=7)
  parts = [events[:50], events[50:100], events[100:]]
  create_topic(kafka_broker, 'crash')
  create_topic(kafka_broker, 'crash_predictions')
  job = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.streaming',
       *flink_flags(flink_cluster), '--bootstrap_servers', kafka_broker,
       '--input_topic', 'crash', '--output_topic', 'crash_predictions',
       '--checkpointing_interval', str(CHECKPOINT_MS),
       '--model_dir', trained['model_dir'], '--file_every', '1s',
       '--max_bundle_time_mills', '200', '--output_dir', str(tmp_path / 'out')],
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    sent = _produce_events(kafka_broker, 'crash', parts[0],
                           str(tmp_path / 'part0.jsonl'))
    first_scored = len(_counts(kafka_broker, 'crash_predictions', sent, 300))
    if first_scored != sent:
      # Once in four runs no prediction came here within 300 s, inside
      # the full suite only: say what the job said.
      job.send_signal(signal.SIGINT)
      _, err = job.communicate(timeout=120)
      raise AssertionError(f'{first_scored} of {sent} first events scored; '
                           f'the job\'s stderr ends: {err[-3000:]}')
    scored_ms = int(time.time() * 1000)
    jid = _wait_for('the running job', lambda: _running_job(flink_cluster))
    _wait_for('a checkpoint after the first predictions',
              lambda: _checkpoint_after(flink_cluster, jid, scored_ms), 120)
    sent += _produce_events(kafka_broker, 'crash', parts[1],
                            str(tmp_path / 'part1.jsonl'))
    crash = run_script('flink_cluster.sh', 'crash-taskmanager',
                       flink_cluster.env)
    assert crash.returncode == 0, crash.stderr
    sent += _produce_events(kafka_broker, 'crash', parts[2],
                            str(tmp_path / 'part2.jsonl'))
    # Every event scored (duplicates make more rows than events: wait for
    # the ids, not the rows).
    _wait_for('a prediction of every event', lambda: len(_counts(
        kafka_broker, 'crash_predictions', 2 * sent, 2)) == sent, 300)
    time.sleep(3)  # rows written again after the restart, still in flight
    counts = _counts(kafka_broker, 'crash_predictions', 2 * sent, 3)
    checkpoints = _rest(flink_cluster, f'/jobs/{jid}/checkpoints')
  finally:
    if job.poll() is None:
      job.send_signal(signal.SIGINT)
      try:
        job.communicate(timeout=120)
      except subprocess.TimeoutExpired:
        job.kill()
        raise
  # Restarted from a checkpoint, not from the topic's start.
  assert checkpoints['counts']['restored'] >= 1
  ids = [e['transaction_id'] for e in events]
  assert set(counts) == set(ids)
  first = {e['transaction_id'] for e in parts[0]}
  # Restored from a checkpoint taken after the first part was scored: its
  # predictions are never written again.
  assert all(counts[i] == 1 for i in first)
  twice = sum(n - 1 for n in counts.values())
  assert twice <= len(parts[1])
  print(f'crash: {len(ids)} events, {twice} scored twice (load '
        f'{os.getloadavg()[0]:.1f})')
  # The shared cluster is healthy for the tests after: one TaskManager,
  # both slots free once the job is cancelled.
  overview = _wait_for('both slots free', lambda: (
      lambda o: o if o['taskmanagers'] == 1 and o['slots-available'] == 2
      else None)(_rest(flink_cluster, '/overview')), 120)
  assert overview['slots-total'] == 2
