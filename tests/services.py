"""Local Flink and Kafka for the tests: pytest fixtures over the scripts a
user runs (runners/flink_cluster.sh, runners/kafka_broker.sh), on 127.0.0.1.

The jars come from runners/fetch_jars.sh (`.ci/run` and `make test` run it
first). A missing jar fails the test that needs it, with the command that
fetches it: it is never a skip, so CI cannot pass without running these.

    pytest_plugins = ['tests.services']
    def test_x(flink_cluster, kafka_broker): ...
"""

import dataclasses
import os
import socket
import subprocess
import sys
from typing import Iterable, List, Union

import pytest

from schemas.dataset import Dataset
from transforms.read import read_file
from transforms.stream_sources import replay_order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JARS = os.environ.get('MLPIPE_JARS', os.path.join(REPO, 'runners', '.jars'))
JOB_SERVER_JAR = os.path.join(JARS, 'beam-flink-job-server.jar')
EXPANSION_JAR = os.path.join(JARS, 'beam-expansion-service.jar')


def free_port() -> int:
  """A port nothing listens on (bound, then released): two test runs on one
  machine never collide on a fixed 8081 or 9092."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class FlinkCluster:
  """A running session cluster and its Python worker pool."""
  master: str       # --flink_master, 127.0.0.1:<REST port>
  worker_pool: str  # --environment_config of EXTERNAL workers
  state: str        # MLPIPE_RUN of the scripts: conf, logs, pids
  env: dict         # what flink_cluster.sh needs to act on this cluster


def require_jars():
  """Fails (never skips) when runners/fetch_jars.sh has not run."""
  missing = [p for p in (JOB_SERVER_JAR, EXPANSION_JAR,
                         os.path.join(JARS, 'flink', '.fetched'),
                         os.path.join(JARS, 'kafka', '.fetched'))
             if not os.path.exists(p)]
  if missing:
    pytest.fail(f'{missing[0]} is missing: run runners/fetch_jars.sh first '
                '(make test and .ci/run do)', pytrace=False)


def run_script(name: str, action: str, env: dict,
               timeout: float = 180) -> subprocess.CompletedProcess:
  """runners/<name> <action> with `env` added to this process's."""
  return subprocess.run([os.path.join(REPO, 'runners', name), action],
                        env=dict(os.environ, MLPIPE_JARS=JARS, **env),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _start(name: str, env: dict):
  done = run_script(name, 'start', env)
  if done.returncode != 0:
    pytest.fail(f'{name} start failed: {done.stderr.strip()}', pytrace=False)


@pytest.fixture(scope='session')
def flink_cluster(tmp_path_factory):
  """A Flink session cluster (2 slots) and its Python worker pool
  (runners/worker_pool.sh) on free ports of 127.0.0.1, for the session;
  yields a FlinkCluster (give it to flink_flags)."""
  require_jars()
  state = str(tmp_path_factory.mktemp('flink-run'))
  env = {'MLPIPE_RUN': state, 'FLINK_REST_PORT': str(free_port()),
         'FLINK_RPC_PORT': str(free_port()),
         'WORKER_POOL_PORT': str(free_port()),
         'PYTHON': sys.executable}
  _start('worker_pool.sh', env)
  try:
    _start('flink_cluster.sh', env)
    try:
      yield FlinkCluster(f'127.0.0.1:{env["FLINK_REST_PORT"]}',
                         f'127.0.0.1:{env["WORKER_POOL_PORT"]}', state, env)
    finally:
      run_script('flink_cluster.sh', 'stop', env)
  finally:
    run_script('worker_pool.sh', 'stop', env)


@pytest.fixture(scope='session')
def kafka_broker(tmp_path_factory):
  """A KRaft Kafka broker on a free port of 127.0.0.1 for the session;
  yields --bootstrap_servers."""
  require_jars()
  state = str(tmp_path_factory.mktemp('kafka-run'))
  env = {'MLPIPE_RUN': state, 'KAFKA_PORT': str(free_port()),
         'KAFKA_CONTROLLER_PORT': str(free_port())}
  _start('kafka_broker.sh', env)
  try:
    yield f'127.0.0.1:{env["KAFKA_PORT"]}'
  finally:
    run_script('kafka_broker.sh', 'stop', env)


def flink_flags(cluster: Union[FlinkCluster, str],
                parallelism: int = 2) -> List[str]:
  """The flags of a job on `cluster` at `parallelism`: EXTERNAL workers
  from its pool, one process per slot (a plain --flink_master string, e.g.
  '[local]', gets LOOPBACK workers)."""
  if isinstance(cluster, str):
    workers = ['--environment_type', 'LOOPBACK']
    master = cluster
  else:
    workers = ['--environment_type', 'EXTERNAL', '--environment_config',
               cluster.worker_pool, '--sdk_worker_parallelism',
               str(parallelism)]
    master = cluster.master
  return ['--runner', 'FlinkRunner', '--flink_master', master, *workers,
          '--parallelism', str(parallelism), '--flink_job_server_jar',
          JOB_SERVER_JAR]


def create_topic(bootstrap: str, topic: str, partitions: int = 2):
  """Creates `topic` unless it exists."""
  from kafka.admin import KafkaAdminClient, NewTopic  # pylint: disable=import-outside-toplevel
  from kafka.errors import TopicAlreadyExistsError  # pylint: disable=import-outside-toplevel
  admin = KafkaAdminClient(bootstrap_servers=bootstrap)
  try:
    admin.create_topics([NewTopic(topic, partitions, 1)])
  except TopicAlreadyExistsError:
    pass
  finally:
    admin.close()


def produce_file(bootstrap: str, topic: str, paths: Iterable[str],
                 dataset: Dataset, partitions: int = 2) -> int:
  """Sends the records of `paths` to `topic` in event-time order (as a
  replay emits them), one Kafka record each: the record's text as value,
  its entity as key (an entity's events stay in order on one partition),
  its event time as the record's timestamp (CreateTime); records whose
  event time cannot be read take their neighbour's (replay_order).
  Returns the number of records sent."""
  from kafka import KafkaProducer  # pylint: disable=import-outside-toplevel
  create_topic(bootstrap, topic, partitions)
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
