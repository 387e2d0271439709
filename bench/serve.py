"""Load benchmark of the scoring service (by hand, not a test).

    python -m bench.serve --model_dir data/output/model

Starts a throwaway redis-server (127.0.0.1, temp dir, no persistence),
materialises the state of `--users` generated users into it with the batch
writer (`pipelines.serving.materialise`), starts `python -m pipelines.serve` as
a second process and sends it POST /score requests from this one, over
loopback, from one asyncio event loop writing raw HTTP/1.1 on kept-alive
connections opened before the clock starts (the client shares the two
cores with the service, so it should take as little of them as it can;
its CPU per request is printed):

  * open loop at each `--rates` (requests per second) for `--seconds`
    (bounded: at most rate x seconds requests), latency measured from the
    moment each request was due, so a server (or client) that falls
    behind shows it;
  * closed loop: `--concurrency` clients back to back for `--seconds`,
    the most the service answers.

Prints one table: requests, errors, p50, p99, max latency, achieved
requests per second, the service's CPU time per request (its processes'
user + system time from /proc: load-robust, unlike latency) and the part
of it on its event loops (the main threads), the client's own, and the
machine's 1-minute load average after each row (os.getloadavg: other
jobs on the machine show there). `--workers N`,
`--batch_window_ms` and `--service_args '...'` go to the service.

On a shared machine, `--peer_tree DIR [--peer_python PY]` serves the same
model and store from a second checkout too (an older commit) and measures
both in alternating rounds, one table, so the machine's other load falls
on both alike: the before/after comparison of one run.
"""

import argparse
import asyncio
import functools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
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


class _Connection:
  """One kept-alive HTTP/1.1 connection, raw bytes over asyncio streams:
  the cheapest client Python has (no HTTP library's per-request objects),
  so the load generator takes as little of the cores the service shares
  with it as it can. Reads a response by its Content-Length (uvicorn
  always sends one for these routes)."""

  def __init__(self, reader, writer, host):
    self.reader, self.writer, self.host = reader, writer, host

  @classmethod
  async def open(cls, host, port):
    reader, writer = await asyncio.open_connection(host, port)
    return cls(reader, writer, f'{host}:{port}')

  async def request(self, method, path, body=b''):
    """-> (status, body)"""
    self.writer.write(
        f'{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n'
        f'Content-Type: application/json\r\n'
        f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
    head = await self.reader.readuntil(b'\r\n\r\n')
    status = int(head[9:12])
    length = 0
    for line in head.split(b'\r\n')[1:]:
      if line[:15].lower() == b'content-length:':
        length = int(line[15:])
    return status, await self.reader.readexactly(length)

  def close(self):
    self.writer.close()


def _cpu_seconds(pid):
  """(all, event loop): user + system CPU seconds of process `pid` and its
  descendants alive now (the workers of --workers N, the model processes
  of --scoring process), from /proc: the service's own cost per request,
  which other jobs on the machine do not inflate the way they inflate
  latency; and of the serving processes' main threads alone, the event
  loops (every request's HTTP, validation and store round trip), where
  the rest is the model's (its thread or process, and TensorFlow's)."""
  tick = os.sysconf('SC_CLK_TCK')
  total = loop = 0.0
  pids, models, at = [pid], set(), 0
  while at < len(pids):
    try:
      for task in os.listdir(f'/proc/{pids[at]}/task'):
        with open(f'/proc/{pids[at]}/task/{task}/children') as f:
          pids += [int(c) for c in f.read().split()]
      with open(f'/proc/{pids[at]}/comm') as f:
        if f.read().strip() == 'mlpipe-model':    # a model process
          models.add(pids[at])
    except OSError:
      pass
    at += 1
  for p in pids:
    for path in (f'/proc/{p}/stat', f'/proc/{p}/task/{p}/stat'):
      try:
        with open(path) as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      seconds = (int(fields[11]) + int(fields[12])) / tick
      if path.startswith(f'/proc/{p}/task/'):
        loop += 0.0 if p in models else seconds
      else:
        total += seconds
  return total, loop


async def _open_loop(host, port, bodies, *, rate, seconds, connections):
  """Open loop: request i is due at start + i / rate whatever the answers
  so far; it goes out on an idle connection of the pool (opened before the
  clock starts), and its latency runs from its due time to its answer, so
  a service (or a client) that falls behind shows it. -> (requests,
  errors, latencies, achieved rate)."""
  n = int(rate * seconds)
  latencies, errors = [], [0]
  idle = asyncio.Queue()
  for _ in range(connections):
    connection = await _Connection.open(host, port)
    await connection.request('GET', '/healthz')
    idle.put_nowait(connection)

  async def send(i, due):
    connection = await idle.get()
    try:
      status, _ = await connection.request('POST', '/score',
                                           bodies[i % len(bodies)])
      ok = status == 200
    except (OSError, asyncio.IncompleteReadError, ValueError):
      ok = False
      connection.close()
      connection = await _Connection.open(host, port)
    latencies.append(time.perf_counter() - due)
    errors[0] += not ok
    idle.put_nowait(connection)

  start = time.perf_counter() + 0.5
  tasks = []
  for i in range(n):
    due = start + i / rate
    delay = due - time.perf_counter()
    if delay > 0:
      await asyncio.sleep(delay)
    tasks.append(asyncio.ensure_future(send(i, due)))
  await asyncio.gather(*tasks)
  elapsed = time.perf_counter() - start
  while not idle.empty():
    idle.get_nowait().close()
  return n, errors[0], latencies, n / elapsed


async def _closed_loop(host, port, bodies, *, concurrency, seconds):
  """`concurrency` connections, each sending its next request as soon as
  the last is answered, for `seconds`: the most the service answers."""
  latencies, errors = [], [0]
  end = time.perf_counter() + seconds

  async def worker(k):
    connection = await _Connection.open(host, port)
    i = k
    while time.perf_counter() < end:
      t0 = time.perf_counter()
      status, _ = await connection.request('POST', '/score',
                                           bodies[i % len(bodies)])
      latencies.append(time.perf_counter() - t0)
      errors[0] += status != 200
      i += concurrency
    connection.close()

  start = time.perf_counter()
  await asyncio.gather(*(worker(k) for k in range(concurrency)))
  return len(latencies), errors[0], latencies, len(latencies) / (
      time.perf_counter() - start)


class _Row:
  """One service's totals over the rounds of one load."""

  def __init__(self):
    self.n = self.errors = 0
    self.latencies, self.rates = [], []
    self.service_cpu = self.loop_cpu = self.client_cpu = 0.0
    self.load = 0.0

  def add(self, run, service_pid):
    """Runs `run()` -> (requests, errors, latencies, rps), with the
    client's own CPU and the service's, and the 1-minute load average
    after it."""
    client0, (service0, loop0) = (time.process_time(),
                                  _cpu_seconds(service_pid))
    n, errors, latencies, rps = run()
    self.client_cpu += time.process_time() - client0
    service1, loop1 = _cpu_seconds(service_pid)
    self.service_cpu += service1 - service0
    self.loop_cpu += loop1 - loop0
    self.n, self.errors = self.n + n, self.errors + errors
    self.latencies += latencies
    self.rates.append(rps)
    self.load = max(self.load, os.getloadavg()[0])

  def cells(self):
    lat, count = self.latencies, max(len(self.latencies), 1)
    return (f'{self.n} | {self.errors} | {_percentile(lat, .5) * 1e3:.1f} '
            f'| {_percentile(lat, .99) * 1e3:.1f} | {max(lat) * 1e3:.1f} '
            f'| {sum(self.rates) / len(self.rates):.0f} '
            f'| {self.service_cpu / count * 1e3:.2f} '
            f'| {self.loop_cpu / count * 1e3:.2f} '
            f'| {self.client_cpu / count * 1e3:.2f} | {self.load:.1f}')


def _start_service(python, tree, model_dir, store, port, args):
  """`python -m pipelines.serve` from `tree` (None: this one) on `port`."""
  env = dict(os.environ)
  if tree:
    env['PYTHONPATH'] = tree
  process = subprocess.Popen(
      [python, '-m', 'pipelines.serve', '--model_dir', model_dir,
       '--online_store', store, '--port', str(port),
       '--workers', str(args.workers),
       '--batch_window_ms', str(args.batch_window_ms)]
      + shlex.split(args.service_args), stdout=subprocess.DEVNULL,
      cwd=tree or None, env=env)
  print(f'service pid {process.pid} ({tree or "this tree"})',
        file=sys.stderr)
  return process


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m bench.serve')
  p.add_argument('--model_dir', default='data/output/model')
  p.add_argument('--users', type=int, default=10000)
  p.add_argument('--rows', type=int, default=100000)
  p.add_argument('--rates', default='50,100,200')
  p.add_argument('--seconds', type=float, default=15)
  p.add_argument('--concurrency', type=int, default=4)
  p.add_argument('--connections', type=int, default=32,
                 help='Open-loop client: kept-alive connections, opened '
                 'before the clock starts (a request due while all are '
                 'busy waits for one, its wait counted).')
  p.add_argument('--workers', type=int, default=1)
  p.add_argument('--batch_window_ms', type=float, default=0.0)
  p.add_argument('--service_args', default='',
                 help='More flags for pipelines.serve, one string.')
  p.add_argument('--peer_tree', default=None,
                 help='Also serve the same model and store from this '
                 'checkout (e.g. an older commit, `git archive` into a '
                 'folder) and measure both in alternating rounds: the '
                 'machine\'s other load falls on both alike.')
  p.add_argument('--peer_python', default=sys.executable,
                 help='The interpreter of --peer_tree (its venv).')
  p.add_argument('--rounds', type=int, default=None,
                 help='Each load is measured in this many slices of '
                 '--seconds / rounds, alternating the services (default '
                 '1, or 3 with --peer_tree).')
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
  services = {}
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
    services = {'this tree': _start_service(
        sys.executable, None, args.model_dir, store, http_port, args)}
    ports = {'this tree': http_port}
    if args.peer_tree:
      ports['peer'] = _free_port()
      services['peer'] = _start_service(
          args.peer_python, args.peer_tree, args.model_dir, store,
          ports['peer'], args)
    for name, port_ in ports.items():
      base = f'http://127.0.0.1:{port_}'
      _wait(f'{base}/healthz', 600)
      with httpx.Client() as warm:          # first calls trace the graph
        for body in raw[:50]:
          warm.post(f'{base}/score', content=body)
    rounds = args.rounds or (3 if args.peer_tree else 1)
    loads = [(f'open loop {rate:g} rps', functools.partial(
        _open_loop, rate=rate, seconds=args.seconds / rounds,
        connections=args.connections))
             for rate in [float(r) for r in args.rates.split(',')]]
    loads.append((f'closed loop x{args.concurrency}', functools.partial(
        _closed_loop, concurrency=args.concurrency,
        seconds=args.seconds / rounds)))
    print('| load | service | requests | errors | p50 ms | p99 ms | max ms '
          '| rps | service CPU ms/req | of it event loop | client CPU ms/req '
          '| load avg |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
          flush=True)
    for label, load in loads:
      rows = {name: _Row() for name in services}
      for k in range(rounds):
        # Alternate which service goes first, so neither always follows
        # the other's tail.
        order = list(services) if k % 2 == 0 else list(services)[::-1]
        for name in order:
          rows[name].add(lambda: asyncio.run(load(
              '127.0.0.1', ports[name], raw)), services[name].pid)
      for name, row in rows.items():
        print(f'| {label} | {name} | {row.cells()} |', flush=True)
  finally:
    for process in list(services.values()) + [redis_server]:
      if process is not None:
        process.terminate()
        process.wait(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
