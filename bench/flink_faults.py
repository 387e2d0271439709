"""A TaskManager crash in the middle of a Kafka stream, with checkpoints.

    python -m bench.flink_faults --model_dir M [--events 2000]
        [--checkpointing_interval 2000]

Starts its own worker pool, Flink cluster and Kafka broker on free ports,
produces `--events` generated transactions (two partitions, keyed by
user), starts pipelines.streaming on them (unbounded read,
`--checkpointing_interval` ms), and once a third of the predictions came,
kills the TaskManager with SIGKILL and starts a new one
(runners/flink_cluster.sh crash-taskmanager). Flink restarts the job from
its last checkpoint; the bench waits until every event has a prediction
(or none came for 120 s), then counts the output topic: events with no
prediction, with one, with more (the Kafka write is at-least-once: rows
written after the last checkpoint and before the crash are written again),
and prints one table row for bench/RESULTS.md. Exit code 1 when an event
has no prediction.
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from pipelines.synthetic.transactions import generate_transactions, write_records
from schemas.dataset import load_dataset
from tests.services import (JOB_SERVER_JAR, create_topic, free_port,
                            produce_file, run_script)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jobs(rest):
  with urllib.request.urlopen(f'http://{rest}/jobs/overview', timeout=5) as r:
    return json.load(r)['jobs']


def _restarts(rest, jid):
  """Flink's count of the job's restarts (numRestarts)."""
  url = f'http://{rest}/jobs/{jid}/metrics?get=numRestarts'
  with urllib.request.urlopen(url, timeout=5) as r:
    values = json.load(r)
  return int(float(values[0]['value'])) if values else 0


def main(argv=None):
  # pylint: disable=import-outside-toplevel
  from kafka import KafkaConsumer
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--events', type=int, default=2000)
  parser.add_argument('--checkpointing_interval', type=int, default=2000)
  args = parser.parse_args(argv)
  state = tempfile.mkdtemp(prefix='flink-faults-')
  env = {'MLPIPE_RUN': state, 'FLINK_REST_PORT': str(free_port()),
         'FLINK_RPC_PORT': str(free_port()),
         'WORKER_POOL_PORT': str(free_port()), 'KAFKA_PORT': str(free_port()),
         'KAFKA_CONTROLLER_PORT': str(free_port()), 'PYTHON': sys.executable}
  rest = f'127.0.0.1:{env["FLINK_REST_PORT"]}'
  kafka = f'127.0.0.1:{env["KAFKA_PORT"]}'
  dataset = load_dataset('transactions')
  events = generate_transactions(args.events, seed=11, days=7)
  path = os.path.join(state, 'events.jsonl')
  write_records(events, path, 'jsonl')
  job = None
  try:
    for name in ('worker_pool.sh', 'flink_cluster.sh', 'kafka_broker.sh'):
      done = run_script(name, 'start', env)
      if done.returncode:
        sys.exit(done.stderr.strip())
    create_topic(kafka, 'in')
    create_topic(kafka, 'out')
    produce_file(kafka, 'in', [path], dataset)
    log = open(os.path.join(state, 'job.log'), 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    job = subprocess.Popen(
        [sys.executable, '-m', 'pipelines.streaming', '--runner',
         'FlinkRunner', '--flink_master', rest, '--parallelism', '2',
         '--environment_type', 'EXTERNAL', '--environment_config',
         f'127.0.0.1:{env["WORKER_POOL_PORT"]}', '--sdk_worker_parallelism',
         '2', '--flink_job_server_jar', JOB_SERVER_JAR,
         '--checkpointing_interval', str(args.checkpointing_interval),
         '--bootstrap_servers', kafka, '--input_topic', 'in',
         '--output_topic', 'out', '--model_dir', args.model_dir,
         '--output_dir', os.path.join(state, 'out')],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    consumer = KafkaConsumer('out', bootstrap_servers=kafka,
                             auto_offset_reset='earliest',
                             enable_auto_commit=False)
    counts = collections.Counter()
    crashed_at = None
    # The idle clock starts at the first prediction: the job's start-up
    # took minutes on a busy machine.
    last, began = None, time.monotonic()
    while ((last or began + 780) > time.monotonic() - 120 and
           len(counts) < len(events) and job.poll() is None):
      for records in consumer.poll(timeout_ms=500).values():
        last = time.monotonic()
        for rec in records:
          counts[json.loads(rec.value)['transaction_id']] += 1
      if crashed_at is None and len(counts) >= len(events) // 3:
        crashed_at = len(counts)
        run_script('flink_cluster.sh', 'crash-taskmanager', env)
        last = time.monotonic()
    time.sleep(5)  # rows written again after the restart, still in flight
    for records in consumer.poll(timeout_ms=2000).values():
      for rec in records:
        counts[json.loads(rec.value)['transaction_id']] += 1
    consumer.close()
    running = [j for j in _jobs(rest) if j['state'] == 'RUNNING']
    restarts = _restarts(rest, running[0]['jid']) if running else None
  finally:
    if job is not None and job.poll() is None:
      job.send_signal(signal.SIGINT)
      try:
        job.wait(timeout=60)
      except subprocess.TimeoutExpired:
        job.kill()
    for name in ('kafka_broker.sh', 'flink_cluster.sh', 'worker_pool.sh'):
      run_script(name, 'stop', env)
  ids = [e['transaction_id'] for e in events]
  missing = sum(1 for i in ids if counts[i] == 0)
  once = sum(1 for i in ids if counts[i] == 1)
  more = sum(1 for i in ids if counts[i] > 1)
  extra = sum(counts[i] - 1 for i in ids if counts[i] > 1)
  print('| events | crash after | checkpoint ms | restarts | no prediction '
        '| exactly one | more than one (extra rows) | load 1/5/15 |')
  print('|---|---|---|---|---|---|---|---|')
  print(f'| {len(ids)} | {crashed_at} predictions | '
        f'{args.checkpointing_interval} | {restarts} | {missing} | {once} | '
        f'{more} ({extra}) | '
        f'{"/".join(f"{x:.1f}" for x in os.getloadavg())} |')
  print(f'(logs in {state})')
  return 1 if missing else 0


if __name__ == '__main__':
  sys.exit(main())
