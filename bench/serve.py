"""Load benchmark of the scoring service (by hand, not a test).

    python -m bench.serve --model_dir data/output/model

Starts a throwaway redis-server (127.0.0.1, temp dir, no persistence),
materialises the state of `--users` generated users into it with the batch
writer (`pipelines.serving.materialise`), starts `python -m pipelines.serve` as
a second process and sends it POST /score requests from this one, over
loopback:

  * open loop at each `--rates` (requests per second) for `--seconds`
    (bounded: at most rate x seconds requests), latency measured from the
    moment each request was due, so a server that falls behind shows it;
  * closed loop: `--concurrency` clients back to back for `--seconds`,
    the most the service answers.

Prints one table: requests, errors, p50, p99, max latency, achieved
requests per second and the machine's 1-minute load average after each
row (os.getloadavg: other jobs on the machine show there). `--workers N`
and `--batch_window_ms` are passed to the service.
"""

import argparse
import concurrent.futures
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pyarrow as pa
import pyarrow.parquet as pq


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait(url: str, seconds: float):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    try:
      if httpx.get(url, timeout=2).status_code == 200:
        return
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  raise SystemExit(f'error: {url} did not answer in {seconds:.0f} s')


def _percentile(values, q):
  values = sorted(values)
  if not values:
    return float('nan')
  return values[min(len(values) - 1, int(q * len(values)))]


def _open_loop(url, bodies, rate, seconds, threads):
  n = int(rate * seconds)
  latencies, errors = [], [0]
  lock = threading.Lock()
  # Clients (and their connections) made and used once before the clock
  # starts: a client built on a request's path costs tens of ms, and with
  # one per thread that was 1-2% of the requests, i.e. the p99.
  clients = queue.SimpleQueue()
  health = url.rsplit('/', 1)[0] + '/healthz'
  for _ in range(threads):
    client = httpx.Client(timeout=10)
    client.get(health)
    clients.put(client)

  def send(i, due):
    client = clients.get()
    delay = due - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    try:
      ok = client.post(url, content=bodies[i % len(bodies)]).status_code == 200
    except httpx.HTTPError:
      ok = False
    done = time.perf_counter()
    clients.put(client)
    with lock:
      latencies.append(done - due)
      errors[0] += not ok

  start = time.perf_counter() + 0.5
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i in range(n):
      due = start + i / rate
      while due - time.perf_counter() > 0.2:   # keep the queue short
        time.sleep(0.05)
      pool.submit(send, i, due)
  elapsed = time.perf_counter() - start
  while not clients.empty():
    clients.get().close()
  return n, errors[0], latencies, n / elapsed


def _closed_loop(url, bodies, concurrency, seconds):
  latencies, errors, count = [], [0], [0]
  lock = threading.Lock()
  end = time.perf_counter() + seconds

  def worker(k):
    with httpx.Client(timeout=10) as client:
      i = k
      while time.perf_counter() < end:
        t0 = time.perf_counter()
        ok = client.post(url, content=bodies[i % len(bodies)]
                         ).status_code == 200
        with lock:
          latencies.append(time.perf_counter() - t0)
          errors[0] += not ok
          count[0] += 1
        i += concurrency

  start = time.perf_counter()
  threads = [threading.Thread(target=worker, args=(k,))
             for k in range(concurrency)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return count[0], errors[0], latencies, count[0] / (
      time.perf_counter() - start)


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m bench.serve')
  p.add_argument('--model_dir', default='data/output/model')
  p.add_argument('--users', type=int, default=10000)
  p.add_argument('--rows', type=int, default=100000)
  p.add_argument('--rates', default='50,100,200')
  p.add_argument('--seconds', type=float, default=15)
  p.add_argument('--concurrency', type=int, default=4)
  p.add_argument('--threads', type=int, default=32)
  p.add_argument('--workers', type=int, default=1)
  p.add_argument('--batch_window_ms', type=float, default=0.0)
  args = p.parse_args(argv)
  if not os.path.exists(os.path.join(args.model_dir, 'metadata.json')):
    raise SystemExit(f'error: --model_dir {args.model_dir} holds no model '
                     '(python -m pipelines.batch trains one)')
  if shutil.which('redis-server') is None:
    raise SystemExit('error: redis-server is not installed')

  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from pipelines.synthetic.transactions import generate_transactions  # pylint: disable=g-import-not-at-top
  from schemas.dataset import load_dataset  # pylint: disable=g-import-not-at-top
  from pipelines.serving import materialise  # pylint: disable=g-import-not-at-top
  from transforms import online_store  # pylint: disable=g-import-not-at-top
  from transforms.history_features import history_table  # pylint: disable=g-import-not-at-top
  from transforms.parse import rfc3339_to_micros  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix='bench-serve-')
  port, http_port = _free_port(), _free_port()
  store = f'redis://127.0.0.1:{port}/0'
  redis_server = subprocess.Popen(
      ['redis-server', '--bind', '127.0.0.1', '--port', str(port), '--dir',
       tmp, '--save', '', '--appendonly', 'no', '--loglevel', 'warning'],
      stdout=subprocess.DEVNULL)
  service = None
  try:
    dataset = load_dataset()
    records = generate_transactions(rows=args.rows, users=args.users, seed=11)
    raw = [json.dumps(r).encode() for r in records[-5000:]]
    for r in records:
      r['event_time'] = rfc3339_to_micros(r['event_time'])
    table = history_table(pa.Table.from_pylist(
        records, schema=dataset.batch_schema()), dataset)
    pq.write_table(table, os.path.join(tmp, 'features.parquet'))
    time.sleep(0.5)
    t0 = time.perf_counter()
    written = materialise.materialise(
        PipelineOptions([]), dataset, os.path.join(tmp, '*.parquet'), store,
        None, 8)
    print(f'materialised {written["entities_written"]} users, '
          f'{written["records_written"]} records in '
          f'{time.perf_counter() - t0:.1f} s', file=sys.stderr)
    service = subprocess.Popen(
        [sys.executable, '-m', 'pipelines.serve', '--model_dir',
         args.model_dir, '--online_store', store, '--port', str(http_port),
         '--workers', str(args.workers),
         '--batch_window_ms', str(args.batch_window_ms)],
        stdout=subprocess.DEVNULL)
    base = f'http://127.0.0.1:{http_port}'
    _wait(f'{base}/healthz', 180)
    url = f'{base}/score'
    with httpx.Client() as warm:          # first calls trace the graph
      for body in raw[:50]:
        warm.post(url, content=body)
    rows = []
    for rate in [float(r) for r in args.rates.split(',')]:
      rows.append((f'open loop {rate:.0f} rps',) + _open_loop(
          url, raw, rate, args.seconds, args.threads) + (
              os.getloadavg()[0],))
    rows.append((f'closed loop x{args.concurrency}',) + _closed_loop(
        url, raw, args.concurrency, args.seconds) + (os.getloadavg()[0],))
    print('| load | requests | errors | p50 ms | p99 ms | max ms | rps '
          '| load avg |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    for name, n, errors, lat, rps, load in rows:
      print(f'| {name} | {n} | {errors} | {_percentile(lat, .5) * 1e3:.1f} '
            f'| {_percentile(lat, .99) * 1e3:.1f} | {max(lat) * 1e3:.1f} '
            f'| {rps:.0f} | {load:.1f} |')
  finally:
    for process in (service, redis_server):
      if process is not None:
        process.terminate()
        process.wait(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
