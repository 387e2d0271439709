"""A pool of Python SDK workers for Flink's EXTERNAL environment, on
127.0.0.1 only: each worker Flink asks for is a process of its own.

    python -m runners.worker_pool --port 50000 --log_dir runners/.run/pool

runners/worker_pool.sh starts and stops it; a job then runs with
`--environment_type EXTERNAL --environment_config 127.0.0.1:50000
--sdk_worker_parallelism 2` and its Python stages run in two processes,
i.e. on two cores (LOOPBACK runs them all in the submitting process, under
one GIL).

Why not Beam's own `apache_beam.runners.worker.worker_pool_main`: it binds
every interface ([::]), starts `python` from PATH (not this interpreter,
so not this venv), pipes each worker's stdout without ever reading it (a
chatty worker blocks), and gives workers no state cache (every state read
of the dedupe and history steps would then cross to the runner). This
pool uses the same servicer with those four changed, and its workers
weigh cached state faster (runners/state_weights.py) and send their
outputs in messages of 1 MB, not 10 (runners/data_messages.py: the
TaskManager holds up to 100 of them per bundle on its heap).
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import (
    BeamFnExternalWorkerPoolServicer, kill_process_gracefully)

# What LOOPBACK workers get by default (sdk_worker_main's
# --state_cache_size 100 MB; Beam 2.72 default data buffer time).
STATE_CACHE_BYTES = 100 << 20
DATA_BUFFER_TIME_LIMIT_MS = -1

_WORKER = ('import runners.state_weights; runners.state_weights.install(); '
           'import runners.data_messages; runners.data_messages.install(); '
           'from apache_beam.runners.worker.sdk_worker import SdkHarness; '
           'SdkHarness({control!r}, worker_id={worker!r}, '
           'state_cache_size={cache}, data_buffer_time_limit_ms={buffer})'
           '.run()')


class ProcessWorkerPool(BeamFnExternalWorkerPoolServicer):
  """One SDK harness process per StartWorker request, run by this
  interpreter, its output appended to <log_dir>/worker-<id>.log."""

  def __init__(self, log_dir: str, state_cache_size: int = STATE_CACHE_BYTES):
    super().__init__(use_process=True, state_cache_size=state_cache_size,
                     data_buffer_time_limit_ms=DATA_BUFFER_TIME_LIMIT_MS)
    self._log_dir = log_dir
    self._lock = threading.Lock()

  def StartWorker(self, start_worker_request, unused_context):
    code = _WORKER.format(control=start_worker_request.control_endpoint.url,
                          worker=start_worker_request.worker_id,
                          cache=self._state_cache_size,
                          buffer=self._data_buffer_time_limit_ms)
    log_path = os.path.join(self._log_dir, 'workers.log')
    try:
      with open(log_path, 'ab') as log:
        process = subprocess.Popen([sys.executable, '-c', code],
                                   stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, close_fds=True)
      with self._lock:
        self._worker_processes[start_worker_request.worker_id] = process
      logging.info('worker %s started: pid %d',
                   start_worker_request.worker_id, process.pid)
      return beam_fn_api_pb2.StartWorkerResponse()
    except OSError as e:
      return beam_fn_api_pb2.StartWorkerResponse(error=f'{type(e).__name__}: '
                                                 f'{e}')

  def StopWorker(self, stop_worker_request, unused_context):
    with self._lock:
      process = self._worker_processes.pop(stop_worker_request.worker_id,
                                           None)
    if process:
      kill_process_gracefully(process)
    return beam_fn_api_pb2.StopWorkerResponse()

  def stop_all(self):
    with self._lock:
      processes = list(self._worker_processes.values())
      self._worker_processes.clear()
    for process in processes:
      kill_process_gracefully(process)


def serve(port: int, log_dir: str) -> None:
  """Serves on 127.0.0.1:`port` until SIGTERM or SIGINT, then stops every
  worker it started."""
  os.makedirs(log_dir, exist_ok=True)
  pool = ProcessWorkerPool(log_dir)
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                       options=[('grpc.http2.max_pings_without_data', 0),
                                ('grpc.http2.max_ping_strikes', 0)])
  beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
      pool, server)
  if not server.add_insecure_port(f'127.0.0.1:{port}'):
    print(f'worker pool: cannot listen on 127.0.0.1:{port}', file=sys.stderr)
    sys.exit(2)
  done = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: done.set())
  server.start()
  logging.info('worker pool at 127.0.0.1:%d', port)
  done.wait()
  server.stop(0)
  pool.stop_all()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--log_dir', required=True)
  args = parser.parse_args(argv)
  logging.basicConfig()
  # Beam's import may have configured the root logger already.
  logging.getLogger().setLevel(logging.INFO)
  serve(args.port, args.log_dir)


if __name__ == '__main__':
  main()
