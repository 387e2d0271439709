"""Local Flink and Kafka for the tests: pytest fixtures over the scripts a
user runs (runners/flink_cluster.sh, runners/kafka_broker.sh), on 127.0.0.1.

The jars come from runners/fetch_jars.sh (`.ci/run` and `make test` run it
first). A missing jar fails the test that needs it, with the command that
fetches it: it is never a skip, so CI cannot pass without running these.

    pytest_plugins = ['tests.services']
    def test_x(flink_cluster, kafka_broker): ...
"""

import os
import subprocess
from typing import Iterable, List

import pytest

from schemas.dataset import Dataset
from transforms.read import read_file
from transforms.stream_sources import replay_order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JARS = os.environ.get('MLPIPE_JARS', os.path.join(REPO, 'runners', '.jars'))
JOB_SERVER_JAR = os.path.join(JARS, 'beam-flink-job-server.jar')
EXPANSION_JAR = os.path.join(JARS, 'beam-expansion-service.jar')
FLINK_MASTER = 'localhost:8081'
BOOTSTRAP = '127.0.0.1:9092'


def require_jars():
  """Fails (never skips) when runners/fetch_jars.sh has not run."""
  missing = [p for p in (JOB_SERVER_JAR, EXPANSION_JAR,
                         os.path.join(JARS, 'flink', '.fetched'),
                         os.path.join(JARS, 'kafka', '.fetched'))
             if not os.path.exists(p)]
  if missing:
    pytest.fail(f'{missing[0]} is missing: run runners/fetch_jars.sh first '
                '(make test and .ci/run do)', pytrace=False)


def _script(name: str, action: str, state: str):
  env = dict(os.environ, MLPIPE_JARS=JARS, MLPIPE_RUN=state)
  done = subprocess.run([os.path.join(REPO, 'runners', name), action],
                        env=env, capture_output=True, text=True,
                        timeout=180, check=False)
  if action == 'start' and done.returncode != 0:
    pytest.fail(f'{name} start failed: {done.stderr.strip()}', pytrace=False)


@pytest.fixture(scope='session')
def flink_cluster(tmp_path_factory):
  """A Flink session cluster (REST at localhost:8081, 2 slots) for the
  session; yields --flink_master."""
  require_jars()
  state = str(tmp_path_factory.mktemp('flink-run'))
  _script('flink_cluster.sh', 'start', state)
  try:
    yield FLINK_MASTER
  finally:
    _script('flink_cluster.sh', 'stop', state)


@pytest.fixture(scope='session')
def kafka_broker(tmp_path_factory):
  """A KRaft Kafka broker at 127.0.0.1:9092 for the session; yields
  --bootstrap_servers."""
  require_jars()
  state = str(tmp_path_factory.mktemp('kafka-run'))
  _script('kafka_broker.sh', 'start', state)
  try:
    yield BOOTSTRAP
  finally:
    _script('kafka_broker.sh', 'stop', state)


def flink_flags(master: str = FLINK_MASTER, parallelism: int = 2) -> List[str]:
  return ['--runner', 'FlinkRunner', '--flink_master', master,
          '--environment_type', 'LOOPBACK', '--parallelism',
          str(parallelism), '--flink_job_server_jar', JOB_SERVER_JAR]


def produce_file(bootstrap: str, topic: str, paths: Iterable[str],
                 dataset: Dataset, partitions: int = 2) -> int:
  """Sends the records of `paths` to `topic` in event-time order (as a
  replay emits them), one Kafka record each: the record's text as value,
  its entity as key (an entity's events stay in order on one partition),
  its event time as the record's timestamp (CreateTime); records whose
  event time cannot be read take their neighbour's (replay_order).
  Returns the number of records sent."""
  from kafka import KafkaProducer  # pylint: disable=import-outside-toplevel
  from kafka.admin import KafkaAdminClient, NewTopic  # pylint: disable=import-outside-toplevel
  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  try:
    admin.create_topics([NewTopic(topic, partitions, 1)])
  finally:
    admin.close()
  events = replay_order([raw for path in paths
                         for raw in read_file(path, dataset)], dataset)
  producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
  entity = dataset.entity_field
  for micros, raw in events:
    key = (raw.values or {}).get(entity)
    producer.send(topic, value=(raw.text or '').encode('utf-8'),
                  key=None if key is None else str(key).encode('utf-8'),
                  timestamp_ms=micros // 1000)
  producer.flush()
  producer.close()
  return len(events)


def consume_all(bootstrap: str, topic: str, expected: int,
                timeout_s: float = 60) -> List[bytes]:
  """Every value on `topic` from the start, once `expected` are there (or
  whatever is there when `timeout_s` runs out)."""
  from kafka import KafkaConsumer  # pylint: disable=import-outside-toplevel
  consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                           auto_offset_reset='earliest',
                           enable_auto_commit=False,
                           consumer_timeout_ms=int(timeout_s * 1000))
  values = []
  try:
    for message in consumer:
      values.append(message.value)
      if len(values) >= expected:
        break
  finally:
    consumer.close()
  return values


def produce_values(bootstrap: str, topic: str, values: Iterable[bytes],
                   timestamp_ms: int = 1) -> int:
  """Sends raw `values` (no key) to `topic`, stamped `timestamp_ms` (the
  create-time watermark follows the newest timestamp of a partition, so an
  old stamp does not move it). Returns how many were sent."""
  from kafka import KafkaProducer  # pylint: disable=import-outside-toplevel
  producer = KafkaProducer(bootstrap_servers=bootstrap)
  values = list(values)
  for value in values:
    producer.send(topic, value=value, timestamp_ms=timestamp_ms)
  producer.flush()
  producer.close()
  return len(values)
