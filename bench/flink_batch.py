"""The batch scoring run on Flink (worker pool, parallelism 2) beside the
DirectRunner in one process: time and the memory of every process.

    python -m bench.flink_batch --rows 1000000 --runs direct flink
    python -m bench.flink_batch --rows 1000000 4000000 --runs flink
    python -m bench.flink_batch --report bench/.cache/results/flink-<stamp>.json

Each size's data and model come from bench/run.py's cache
(bench/.cache/s<seed>-n<rows>/: generated JSON lines; the model trained on
the 1M cache, unmeasured, unless --model_dir). Each measured run is
`python -m pipelines.batch --model_dir M` (ingest + features, validation,
predict; no training), one after another, never two at once:

  direct  --runner DirectRunner, one process;
  flink   --runner FlinkRunner on a local session cluster started for this
          run alone (runners/flink_cluster.sh: one JobManager, one
          TaskManager with 2 slots) and the external worker pool
          (runners/worker_pool.sh: one Python SDK worker process per slot),
          --parallelism 2 --sdk_worker_parallelism 2, free ports, a
          temporary MLPIPE_RUN; both stopped after the run, so every run
          starts from fresh JVMs (the memory of one run does not carry into
          the next).

Memory: VmRSS of every process, sampled every 0.5 s from /proc and summed:
the driver (`pipelines.batch`), the Beam job server it starts (a Java
child of the driver), the JobManager, the TaskManager, the worker pool and
its SDK workers. The table shows the peak of the sum, the peak of the sum
without the driver, and each part's own peak (the parts' peaks need not
coincide). RSS counts a page shared by several processes (the libraries
the SDK workers and the JVMs map from the same files) once in each, so
the sum overstates what they hold together; the PSS column is the peak
of the sum of proportional set sizes (/proc/<pid>/smaps_rollup: each
shared page divided among the processes sharing it), what they hold. Load averages are read before
and after each run. Results are saved as JSON under bench/.cache/results/.
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Optional

from bench.run import (CACHE, PYTHON, REPO, _children, _rss_kb, batch_cmd,
                       ensure_data, ensure_model, load_average)

POLL_S = 0.5
JARS = os.path.join(REPO, 'runners', '.jars')
JOB_SERVER_JAR = os.path.join(JARS, 'beam-flink-job-server.jar')
PARTS = ('driver', 'job server', 'JobManager', 'TaskManager', 'pool',
         'SDK workers')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cmdline(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
  except OSError:
    return ''


def _descendants(pid: int) -> List[int]:
  out, todo = [], list(_children(pid))
  while todo:
    p = todo.pop()
    out.append(p)
    todo.extend(_children(p))
  return out


class Cluster:
  """A session cluster and worker pool of their own (free ports, a
  temporary state folder), started and stopped by the runners/ scripts."""

  def __init__(self, parallelism: int = 2):
    self.parallelism = parallelism
    self.state = tempfile.mkdtemp(prefix='flink-batch-')
    self.env = {'MLPIPE_RUN': self.state, 'MLPIPE_JARS': JARS,
                'FLINK_REST_PORT': str(free_port()),
                'FLINK_RPC_PORT': str(free_port()),
                'WORKER_POOL_PORT': str(free_port()), 'PYTHON': PYTHON}
    self.rest = f'127.0.0.1:{self.env["FLINK_REST_PORT"]}'

  def _script(self, name: str, action: str):
    done = subprocess.run([os.path.join(REPO, 'runners', name), action],
                          env=dict(os.environ, **self.env), cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode:
      raise RuntimeError(f'{name} {action}: {done.stderr.strip()}')

  def start(self):
    self._script('worker_pool.sh', 'start')
    self._script('flink_cluster.sh', 'start')

  def stop(self):
    for name in ('flink_cluster.sh', 'worker_pool.sh'):
      try:
        self._script(name, 'stop')
      except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f'  {e}', file=sys.stderr)

  def pid(self, name: str) -> Optional[int]:
    path = {'JobManager': 'flink/jobmanager.pid',
            'TaskManager': 'flink/taskmanager.pid',
            'pool': 'worker_pool/pool.pid'}[name]
    try:
      with open(os.path.join(self.state, path)) as f:
        return int(f.read().strip())
    except (OSError, ValueError):
      return None

  def flags(self) -> List[str]:
    return ['--runner', 'FlinkRunner', '--flink_master', self.rest,
            '--environment_type', 'EXTERNAL', '--environment_config',
            f'127.0.0.1:{self.env["WORKER_POOL_PORT"]}',
            '--sdk_worker_parallelism', '2',
            '--parallelism', str(self.parallelism),
            '--flink_job_server_jar', JOB_SERVER_JAR] + (
                # More partitions than the 2 slots: tasks queue for them.
                ['--execution_mode_for_batch', 'BATCH_FORCED']
                if self.parallelism > 2 else [])

  def workers_started(self) -> int:
    """How many SDK worker processes the pool started (runners/
    worker_pool.py logs each)."""
    try:
      with open(os.path.join(self.state, 'worker_pool', 'pool.log')) as f:
        return sum(' started: pid ' in line for line in f)
    except OSError:
      return 0

  def jobs(self) -> List[Dict[str, object]]:
    """The Flink jobs this cluster ran: name, state, seconds."""
    try:
      with urllib.request.urlopen(f'http://{self.rest}/jobs/overview',
                                  timeout=5) as r:
        jobs = json.load(r)['jobs']
    except OSError:
      return []
    return [{'name': j['name'], 'state': j['state'],
             'seconds': j['duration'] / 1000}
            for j in sorted(jobs, key=lambda j: j['start-time'])]


def _pss_kb(pid: int) -> int:
  """The process's proportional set size: its private pages plus its
  share of pages it shares (the SDK workers map the same TensorFlow and
  Arrow libraries; RSS counts those pages once in every process)."""
  try:
    with open(f'/proc/{pid}/smaps_rollup') as f:
      for line in f:
        if line.startswith('Pss:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _parts(driver: int, cluster: Optional[Cluster]) -> Dict[str, List[int]]:
  """The pids of each part now."""
  pids = {part: [] for part in PARTS}
  pids['driver'].append(driver)
  for p in _descendants(driver):
    part = 'job server' if 'java' in _cmdline(p).split(' ', 1)[0] else 'driver'
    pids[part].append(p)
  if cluster:
    for name in ('JobManager', 'TaskManager'):
      pid = cluster.pid(name)
      if pid:
        pids[name].append(pid)
    pool = cluster.pid('pool')
    if pool:
      pids['pool'].append(pool)
      pids['SDK workers'].extend(_descendants(pool))
  return pids


def sample(driver: int, cluster: Optional[Cluster]) -> Dict[str, float]:
  """RSS in MB of each part now, and PSS in MB of all of them ('pss')."""
  pids = _parts(driver, cluster)
  mb = {part: sum(_rss_kb(p) for p in pids[part]) / 1024 for part in PARTS}
  mb['pss'] = sum(_pss_kb(p) for part in PARTS for p in pids[part]) / 1024
  return mb


def measured(cmd: List[str], log_path: str,
             cluster: Optional[Cluster]) -> Dict[str, object]:
  """Runs `cmd` (stderr and stdout to `log_path`), sampling memory."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  peaks = dict.fromkeys(PARTS, 0.0)
  peak_total, peak_pss, peak_cluster, at_start = 0.0, 0.0, 0.0, None
  load_before = load_average()
  began = time.monotonic()
  with open(log_path, 'w') as log:
    log.write('$ ' + ' '.join(cmd) + '\n')
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    while proc.poll() is None:
      now = sample(proc.pid, cluster)
      if at_start is None:
        at_start = now
      pss = now.pop('pss')
      for k, v in now.items():
        peaks[k] = max(peaks[k], v)
      peak_total = max(peak_total, sum(now.values()))
      peak_pss = max(peak_pss, pss)
      peak_cluster = max(peak_cluster, sum(now.values()) - now['driver'])
      time.sleep(POLL_S)
  wall = time.monotonic() - began
  with open(log_path) as f:
    stages = [line.strip() for line in f
              if line.startswith('== ') or line.startswith('   done in')]
  return {'rc': proc.returncode, 'wall_s': wall, 'peak_total_mb': peak_total,
          'peak_total_pss_mb': peak_pss, 'peak_without_driver_mb': peak_cluster,
          'peak_mb': peaks, 'first_sample_mb': at_start or {},
          'load_before': load_before, 'load_after': load_average(),
          'stages': stages, 'log': log_path}


def bench_run(kind: str, rows: int, data: str, model: str,
              work: str, parallelism: int = 2,
              shards: Optional[int] = None) -> Dict[str, object]:
  out = os.path.join(work, f'{kind}-{rows}')
  shutil.rmtree(out, ignore_errors=True)
  log = os.path.join(work, f'{kind}-{rows}.log')
  cmd = batch_cmd(data, out, model)
  cmd += ['--history', os.path.join(work, 'runs.jsonl')]
  if shards:
    cmd += ['--shards', str(shards)]
  cluster = None
  print(f'  {kind} {rows:,} ...', end='', flush=True, file=sys.stderr)
  try:
    if kind == 'flink':
      cluster = Cluster(parallelism)
      cluster.start()
      runner = cmd.index('--runner')
      del cmd[runner:runner + 2]
      cmd += cluster.flags()
    result = measured(cmd, log, cluster)
    if cluster:
      result['flink_jobs'] = cluster.jobs()
      result['workers_started'] = cluster.workers_started()
      result['state'] = cluster.state   # the cluster's logs
  finally:
    if cluster:
      cluster.stop()
  result.update(kind=kind, rows=rows, parallelism=parallelism, shards=shards)
  print(f' {result["wall_s"]:.1f} s, peak {result["peak_total_mb"]:.0f} MB'
        + ('' if result['rc'] == 0 else f'  FAILED rc={result["rc"]} '
           f'(see {log})'), file=sys.stderr, flush=True)
  return result


def table(results: List[Dict[str, object]]) -> str:
  lines = ['| runner | rows | wall s | rows/s | peak RSS, all processes MB | '
           'without the driver | PSS, all processes MB | '
           'driver | job server | JobManager | TaskManager | pool + SDK '
           'workers | load 1/5/15 before -> after |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in results:
    p = r['peak_mb']
    label = ('DirectRunner, 1 process' if r['kind'] == 'direct' else
             f'Flink, parallelism {r.get("parallelism", 2)}, 2 slots, '
             '2 pool workers')
    lines.append(
        f'| {label} | {r["rows"]:,} | {r["wall_s"]:.1f} | '
        f'{r["rows"] / r["wall_s"]:,.0f} | **{r["peak_total_mb"]:,.0f}** | '
        f'{r.get("peak_without_driver_mb", 0):,.0f} | '
        f'{r.get("peak_total_pss_mb", 0):,.0f} | '
        f'{p["driver"]:,.0f} | {p["job server"]:,.0f} | '
        f'{p["JobManager"]:,.0f} | {p["TaskManager"]:,.0f} | '
        f'{p["pool"] + p["SDK workers"]:,.0f} | '
        f'{r["load_before"]} -> {r["load_after"]} |'
        + ('' if r['rc'] == 0 else f' FAILED rc={r["rc"]}'))
  for r in results:
    jobs = r.get('flink_jobs') or []
    if jobs:
      lines.append(f'\n{r["kind"]} {r["rows"]:,}: Flink jobs ' + ', '.join(
          f'{j["state"]} {j["seconds"]:.1f} s' for j in jobs) +
                   f'; SDK workers started: {r.get("workers_started")}')
    lines.append(f'{r["kind"]} {r["rows"]:,}: ' + ' '.join(
        s for s in r['stages']))
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='bench.flink_batch',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--rows', type=int, nargs='+', default=[1_000_000])
  p.add_argument('--runs', nargs='+', choices=('direct', 'flink'),
                 default=['direct', 'flink'])
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--model_dir', default=None,
                 help='default: the model trained on the 1M cache')
  p.add_argument('--report', default=None, metavar='RESULTS_JSON')
  p.add_argument('--parallelism', type=int, default=2,
                 help='Flink partitions (2 slots whatever it is; above 2 '
                 'the job runs with --execution_mode_for_batch '
                 'BATCH_FORCED, tasks queueing for the slots)')
  p.add_argument('--shards', type=int, default=None,
                 help="pipelines.batch's --shards (default: its own)")
  args = p.parse_args(argv)
  if args.report:
    with open(args.report) as f:
      print(table(json.load(f)['results']))
    return 0
  model = args.model_dir or ensure_model(ensure_data(args.seed, 1_000_000))
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  work = os.path.join(CACHE, f'flink-{stamp}')
  os.makedirs(work, exist_ok=True)
  results = []
  for rows in args.rows:
    data = ensure_data(args.seed, rows)
    for kind in args.runs:
      results.append(bench_run(kind, rows, data, model, work,
                               args.parallelism, args.shards))
  os.makedirs(os.path.join(CACHE, 'results'), exist_ok=True)
  path = os.path.join(CACHE, 'results', f'flink-{stamp}.json')
  with open(path, 'w') as f:
    json.dump({'argv': sys.argv[1:], 'results': results}, f, indent=1)
  print(table(results))
  print(f'\nresults: {path}; logs and outputs: {work}')
  return 0 if all(r['rc'] == 0 for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
