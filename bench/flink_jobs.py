"""Many small jobs on one Flink session cluster: does the TaskManager that
ran ten jobs still run the eleventh?

    python -m bench.flink_jobs --jobs 11              # EXTERNAL workers
    python -m bench.flink_jobs --jobs 11 --loopback   # LOOPBACK workers
    python -m bench.flink_jobs --jobs 11 --kafka      # + a Kafka sink

Starts its own cluster and worker pool (runners/flink_cluster.sh,
runners/worker_pool.sh) on free ports under a temporary MLPIPE_RUN, runs
`--jobs` tiny batch jobs one after another (a shuffle and a Python stage
each; with `--kafka` each also writes its rows to a Kafka topic from
the Python workers, and a broker is started too), and prints one line per job (seconds, state) and, at the end, the
TaskManager's metaspace, threads and the "Transport failed" lines of its
log. Exit code 1 when a job did not finish. Measurements go to
bench/RESULTS.md by hand, with the load average.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from tests.services import JOB_SERVER_JAR, free_port, run_script
from transforms.kafka import WriteJsonToKafka


def tiny_job(flags, out_path, kafka=None):
  """100 numbers, keyed into 10 groups, summed: one shuffle, Python
  stages on both sides. Returns (seconds, final state)."""
  start = time.monotonic()
  p = beam.Pipeline(options=PipelineOptions(flags))
  sums = (p
          | beam.Create(range(100))
          | beam.Map(lambda n: (n % 10, n))
          | beam.CombinePerKey(sum))
  if kafka:
    _ = (sums
         | beam.Map(lambda kv: pa.RecordBatch.from_pylist(
             [{'key': str(kv[0]), 'sum': kv[1]}]))
         | WriteJsonToKafka(kafka, 'sums', 'key'))
  _ = (sums
       | beam.combiners.ToList()
       | beam.Map(lambda pairs, path: open(path, 'w').write(
           json.dumps(sorted(pairs))), out_path))
  try:
    state = p.run().wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except
    state = f'failed: {str(e).splitlines()[0][:160]}'
  return time.monotonic() - start, str(state)


def _tm_metrics(rest: str):
  """The TaskManager's metaspace use (MB) and live JVM threads."""
  with urllib.request.urlopen(f'http://{rest}/taskmanagers', timeout=5) as r:
    tm = json.load(r)['taskmanagers'][0]['id']
  names = 'Status.JVM.Memory.Metaspace.Used,Status.JVM.Threads.Count'
  with urllib.request.urlopen(
      f'http://{rest}/taskmanagers/{tm}/metrics?get={names}', timeout=5) as r:
    values = {m['id']: float(m['value']) for m in json.load(r)}
  return (values.get('Status.JVM.Memory.Metaspace.Used', 0) / 2**20,
          int(values.get('Status.JVM.Threads.Count', 0)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--jobs', type=int, default=11)
  parser.add_argument('--loopback', action='store_true')
  parser.add_argument('--kafka', action='store_true')
  args = parser.parse_args(argv)
  state = tempfile.mkdtemp(prefix='flink-jobs-')
  env = {'MLPIPE_RUN': state, 'FLINK_REST_PORT': str(free_port()),
         'FLINK_RPC_PORT': str(free_port()),
         'WORKER_POOL_PORT': str(free_port()), 'PYTHON': sys.executable,
         'KAFKA_PORT': str(free_port()),
         'KAFKA_CONTROLLER_PORT': str(free_port())}
  kafka = f'127.0.0.1:{env["KAFKA_PORT"]}' if args.kafka else None
  services = ('worker_pool.sh', 'flink_cluster.sh') + (
      ('kafka_broker.sh',) if args.kafka else ())
  rest = f'127.0.0.1:{env["FLINK_REST_PORT"]}'
  workers = (['--environment_type', 'LOOPBACK'] if args.loopback else
             ['--environment_type', 'EXTERNAL', '--environment_config',
              f'127.0.0.1:{env["WORKER_POOL_PORT"]}',
              '--sdk_worker_parallelism', '2'])
  flags = ['--runner', 'FlinkRunner', '--flink_master', rest,
           '--parallelism', '2', '--flink_job_server_jar', JOB_SERVER_JAR,
           *workers]
  failed = 0
  try:
    for name in services:
      done = run_script(name, 'start', env)
      if done.returncode:
        print(done.stderr.strip(), file=sys.stderr)
        return 2
    for i in range(1, args.jobs + 1):
      seconds, end = tiny_job(flags, os.path.join(state, f'job{i}.json'),
                              kafka)
      failed += end != 'DONE'
      metaspace, threads = _tm_metrics(rest)
      print(f'job {i:2d}: {seconds:5.1f} s  {end}  (TaskManager metaspace '
            f'{metaspace:.0f} MB, {threads} threads)', flush=True)
  finally:
    log = os.path.join(state, 'flink', 'taskmanager.log')
    transport = subprocess.run(['grep', '-c', 'Transport failed', log],
                               capture_output=True, text=True,
                               check=False).stdout.strip()
    print(f'"Transport failed" lines in the TaskManager log: {transport}')
    for name in reversed(services):
      run_script(name, 'stop', env)
  print(f'{args.jobs - failed} of {args.jobs} jobs finished; load average '
        f'{os.getloadavg()[0]:.1f}; logs in {state}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
