"""Streaming throughput and latency, by hand (not a test):

    runners/worker_pool.sh start; runners/flink_cluster.sh start
    runners/kafka_broker.sh start
    python -m bench.streaming --events 20000 --model_dir /tmp/out/model
    python -m bench.streaming --events 100000 --model_dir M --skip_replay
    python -m bench.streaming --events 20000 --rate 1000 --model_dir M \
        --skip_replay --skip_peer

Generates `--events` transactions (pipelines.generate, seed 1) and measures

  * replay: `pipelines.streaming --input FILE` on the DirectRunner, as a
    subprocess; events per second = events / wall time of the whole run
    (start-up included), and after start-up = events / (that wall time -
    the wall time of a replay of the file's first `--startup_events`
    events: imports, reading, the model, the runner's start). A replay
    emits the file as fast as it can, so its event-to-prediction latency
    is the run itself: not reported.
  * kafka-flink: `pipelines.streaming` reading Kafka on the local Flink
    session cluster (EXTERNAL workers of runners/worker_pool.sh, one
    process per slot, or `--loopback`; `--parallelism`), writing predictions to a
    topic whose records are stamped by the broker (LogAppendTime). Once the
    job runs (an unbounded read, cancelled at the end), `--warmup` events
    go first and the bench waits for their
    predictions (workers started, model loaded); then the measured events
    are produced as fast as the producer can (throughput: latency is then
    mostly time spent queued behind earlier events), or `--rate` a second
    (latency below saturation); the bench waits until all predictions
    came or none came for 120 s. Latency of an event = the
    broker's append time of its prediction - the time it was handed to the
    producer (processing time, ms clock of this machine); events per
    second = predictions / (last prediction - first send). Each row gives
    the load average (`uptime`) before and after, as other work shares
    the machine.
  * peer: after the Flink job, bench/streaming_peer.py (one plain Python
    process, a Kafka client, the project's batch functions, scoring a poll
    at a time) reads the same topic from its start, warm-up events
    included, all of them already there; events per second = scored /
    (last score - first poll). The table gives Flink's rate over the
    peer's.

Prints one table; results go to bench/RESULTS.md by hand.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np

from pipelines.synthetic.transactions import generate_transactions, write_records
from transforms.common import micros_to_rfc3339
from transforms.parse import rfc3339_to_micros

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JARS = os.path.join(REPO, 'runners', '.jars')
# The runners/ scripts' defaults; --bootstrap_servers etc. change them.
BOOTSTRAP = '127.0.0.1:9092'
FLINK = 'localhost:8081'
WORKER_POOL = '127.0.0.1:50000'


def _streaming(args, log):
  # Its own process group: stopping it also stops the Java job server it
  # started (which a SIGTERM to Python alone would leave running).
  return subprocess.Popen([sys.executable, '-m', 'pipelines.streaming', *args],
                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)


def _replay_wall(path, model_dir, work, name):
  began = time.monotonic()
  with open(os.path.join(work, f'{name}.log'), 'w', encoding='utf-8') as log:
    code = _streaming(['--input', path, '--output_dir',
                       os.path.join(work, name), '--model_dir',
                       model_dir], log).wait()
  if code:
    sys.exit(f'error: the replay failed, see {work}/{name}.log')
  return time.monotonic() - began


def replay(path, n, model_dir, work, startup_events):
  load_before = _load()
  small = os.path.join(work, 'startup.jsonl')
  with open(path, encoding='utf-8') as f, open(small, 'w',
                                               encoding='utf-8') as out:
    for _, line in zip(range(startup_events), f):
      out.write(line)
  startup = _replay_wall(small, model_dir, work, 'startup')
  wall = _replay_wall(path, model_dir, work, 'replay')
  return {'events': n, 'wall_s': wall, 'startup_s': startup,
          'events_per_s': n / wall,
          'after_startup_per_s': n / max(wall - startup, 1e-9),
          'load': f'{load_before} -> {_load()}'}


def _running_jobs():
  with urllib.request.urlopen(f'http://{FLINK}/jobs/overview', timeout=2) as r:
    return [j for j in json.load(r)['jobs'] if j['state'] == 'RUNNING']


def _predictions(consumer, want, idle_s):
  """{transaction_id: broker append time ms} of the next `want` records,
  or of those that came before none came for `idle_s` seconds."""
  got, last = {}, time.monotonic()
  while len(got) < want and time.monotonic() - last < idle_s:
    records = consumer.consume(num_messages=5000, timeout=0.5)
    if records:
      last = time.monotonic()
    for rec in records:
      if rec.error() is None:
        got[json.loads(rec.value())['transaction_id']] = rec.timestamp()[1]
  return got


def live_times(records, rate):
  """The records with event i at now + i / rate seconds, in their order:
  a live stream's event times follow the clock."""
  start = int(time.time() * 1e6)
  return [dict(r, event_time=micros_to_rfc3339(start + int(i * 1e6 / rate)))
          for i, r in enumerate(records)]


def _load():
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def kafka_flink(records, warmup, model_dir, work, parallelism, rate=None,
                extra=(), loopback=False):
  # pylint: disable=import-outside-toplevel
  # librdkafka's client (confluent-kafka): the load generator's own CPU
  # stays off the two cores the job under test runs on (kafka-python
  # spent ~100 us of CPU per event sent).
  from confluent_kafka import Consumer, Producer
  from kafka.admin import KafkaAdminClient, NewTopic
  run = uuid.uuid4().hex[:8]
  source, sink = f'bench-in-{run}', f'bench-out-{run}'
  admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP)
  admin.create_topics([
      NewTopic(source, 2, 1),
      NewTopic(sink, 2, 1,
               topic_configs={'message.timestamp.type': 'LogAppendTime'})])
  admin.close()
  consumer = Consumer({'bootstrap.servers': BOOTSTRAP,
                       'group.id': f'bench-{run}',
                       'auto.offset.reset': 'earliest',
                       'enable.auto.commit': False})
  consumer.subscribe([sink])
  log = open(os.path.join(work, 'flink.log'), 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  job = _streaming([
      '--runner', 'FlinkRunner', '--flink_master', FLINK,
      *(['--environment_type', 'LOOPBACK'] if loopback else
        ['--environment_type', 'EXTERNAL', '--environment_config',
         WORKER_POOL, '--sdk_worker_parallelism', str(parallelism)]),
      '--parallelism', str(parallelism),
      '--flink_job_server_jar', os.path.join(JARS, 'beam-flink-job-server.jar'),
      '--bootstrap_servers', BOOTSTRAP, '--input_topic', source,
      '--output_topic', sink,
      '--model_dir', model_dir, '--output_dir', os.path.join(work, 'flink'),
      *extra], log)
  try:
    began = time.monotonic()
    while not _running_jobs():
      if job.poll() is not None or time.monotonic() - began > 600:
        sys.exit(f'error: the Flink job did not start, see {work}/flink.log')
      time.sleep(1)
    started = time.monotonic() - began
    producer = Producer({'bootstrap.servers': BOOTSTRAP, 'linger.ms': 5})
    entity = 'user_id'

    def send(batch, rate=None):
      # Keyed by entity, stamped with the event time (CreateTime), as
      # runners/README.md asks of producers; encoded before the clock.
      messages = [(r['transaction_id'], json.dumps(r).encode('utf-8'),
                   r[entity].encode('utf-8'),
                   rfc3339_to_micros(r['event_time']) // 1000)
                  for r in batch]
      sent, start = {}, time.monotonic()
      for i, (tx, value, key, stamp) in enumerate(messages):
        if rate:  # paced: event i leaves at i / rate seconds
          time.sleep(max(0.0, start + i / rate - time.monotonic()))
        sent[tx] = time.time() * 1000
        while True:
          try:
            producer.produce(source, value=value, key=key, timestamp=stamp)
            break
          except BufferError:   # librdkafka's queue is full: let it send
            producer.poll(0.01)
        producer.poll(0)
      producer.flush()
      return sent

    send(records[:warmup])
    warm = _predictions(consumer, warmup, 300)
    if len(warm) < warmup:
      sys.exit(f'error: {len(warm)} of {warmup} warm-up predictions came; '
               f'see {work}/flink.log')
    measured = records[warmup:]
    load_before = _load()
    sent = send(measured, rate)
    out = _predictions(consumer, len(measured), 120)
    load_after = _load()
  finally:
    # Unbounded read (no --max_num_records: a bounded read ends only
    # when it has read all its records), so cancel the job.
    for j in _running_jobs():
      urllib.request.urlopen(urllib.request.Request(  # pylint: disable=consider-using-with
          f'http://{FLINK}/jobs/{j["jid"]}?mode=cancel', method='PATCH'),
          timeout=10).close()
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGTERM)
      job.wait(timeout=60)
    log.close()
    consumer.close()
  latency = np.array([out[i] - sent[i] for i in sent if i in out])
  # p50 of each fifth of the events in send order: flat when the job keeps
  # up, rising when it falls behind.
  fifths = [float(np.percentile(part, 50))
            for part in np.array_split(latency, 5) if len(part)]
  span_s = (max(out.values()) - min(sent.values())) / 1000
  return {'events': len(measured), 'scored': len(out), 'topic': source,
          'job_start_s': started, 'events_per_s': len(out) / span_s,
          'load': f'{load_before} -> {load_after}',
          'p50_ms': float(np.percentile(latency, 50)),
          'p99_ms': float(np.percentile(latency, 99)),
          'p50_by_fifth_ms': fifths}


def main(argv=None):
  global BOOTSTRAP, FLINK, WORKER_POOL  # pylint: disable=global-statement
  p = argparse.ArgumentParser(prog='bench.streaming')
  p.add_argument('--events', type=int, default=20000)
  p.add_argument('--warmup', type=int, default=500)
  p.add_argument('--model_dir', required=True)
  p.add_argument('--parallelism', type=int, default=2)
  p.add_argument('--skip_replay', action='store_true')
  p.add_argument('--startup_events', type=int, default=50,
                 help='replay: the events of the start-up run, whose wall '
                 'time is taken off the full run\'s')
  p.add_argument('--skip_flink', action='store_true')
  p.add_argument('--skip_peer', action='store_true')
  p.add_argument('--loopback', action='store_true',
                 help='Flink: LOOPBACK workers (this process) instead of '
                 'the worker pool')
  p.add_argument('--bootstrap_servers', default=BOOTSTRAP)
  p.add_argument('--flink_master', default=FLINK)
  p.add_argument('--worker_pool', default=WORKER_POOL)
  p.add_argument('--rate', type=float, default=None,
                 help='Kafka: produce the measured events at this many a '
                 'second (latency below saturation); default: as fast as '
                 'the producer can (throughput; latency is then mostly '
                 'queueing)')
  p.add_argument('--event_times', choices=('live', 'generated'),
                 default='live',
                 help='Kafka: live (default) re-stamps event i at the '
                 'bench\'s start + i / (--rate or 5,000) seconds, as a live '
                 'stream\'s times follow the clock; generated keeps the '
                 'generator\'s 28 days, which KafkaIO\'s create-time '
                 'watermark (the clock, once a partition is caught up) makes '
                 'late for the aggregates')
  p.add_argument('--flink_flag', action='append', default=[],
                 help='extra flag for the Flink job, e.g. '
                 '--flink_flag=--max_bundle_time_mills=100 (repeatable)')
  args = p.parse_args(argv)
  BOOTSTRAP, FLINK = args.bootstrap_servers, args.flink_master
  WORKER_POOL = args.worker_pool
  work = tempfile.mkdtemp(prefix='bench-streaming-')
  records = generate_transactions(args.events + args.warmup, seed=1)
  if args.event_times == 'live':
    records = live_times(records, args.rate or 5000)
  rows = []
  if not args.skip_replay:
    path = os.path.join(work, 'tx.jsonl')
    write_records(records[args.warmup:], path, 'jsonl')
    r = replay(path, args.events, args.model_dir, work, args.startup_events)
    rows.append(('replay, DirectRunner', r['events'], r['events_per_s'],
                 f'{r["wall_s"]:.1f} s run; start-up ({args.startup_events} '
                 f'events) {r["startup_s"]:.1f} s; after start-up '
                 f'{r["after_startup_per_s"]:.0f} events/s', '', '',
                 r['load']))
  if not args.skip_flink:
    r = kafka_flink(records, args.warmup, args.model_dir, work,
                    args.parallelism, args.rate, args.flink_flag,
                    args.loopback)
    sent = f'{args.rate:g}/s' if args.rate else 'at once'
    workers = 'LOOPBACK' if args.loopback else 'worker pool'
    rows.append((f'Kafka on Flink, parallelism {args.parallelism}, '
                 f'{workers}',
                 f'{r["scored"]} of {r["events"]}', r['events_per_s'],
                 f'sent {sent}; job up in {r["job_start_s"]:.0f} s'
                 + ''.join(f'; {f}' for f in args.flink_flag)
                 + '; p50 ms by fifth of the events: ' + ' / '.join(
                     f'{v:.0f}' for v in r['p50_by_fifth_ms']),
                 f'{r["p50_ms"]:.0f}', f'{r["p99_ms"]:.0f}', r['load']))
    if not args.skip_peer:
      load_before = _load()
      done = subprocess.run(
          [sys.executable, '-m', 'bench.streaming_peer',
           '--bootstrap_servers', BOOTSTRAP, '--topic', r['topic'],
           '--events', str(len(records)), '--model_dir', args.model_dir],
          cwd=REPO, capture_output=True, text=True, check=False)
      if done.returncode:
        sys.exit(f'error: the peer failed: {done.stderr[-2000:]}')
      peer = json.loads(done.stdout.strip().splitlines()[-1])
      rows.append(('peer: one Python process, Kafka client, batch '
                   'functions', f'{peer["scored"]} of {peer["events"]}',
                   peer['events_per_s'],
                   f'Flink / peer = '
                   f'{r["events_per_s"] / peer["events_per_s"]:.2f}',
                   '', '', f'{load_before} -> {_load()}'))
  print('| run | events | events/s | notes | p50 ms | p99 ms | load 1/5/15 min '
        '(before -> after) |')
  print('|---|---|---|---|---|---|---|')
  for row in rows:
    print(f'| {row[0]} | {row[1]} | {row[2]:.0f} | {row[3]} | {row[4]} | '
          f'{row[5]} | {row[6]} |')
  print(f'(work files: {work})')


if __name__ == '__main__':
  main()
