"""The scoring service: score one raw record now, from the online store.

    python -m pipelines.serve --registry data/registry \\
        --online_store redis://127.0.0.1:6379/0 --port 8080

  POST /score[?update=true]  a raw record (JSON object) -> 200 {score,
                             predicted_label, risk_category, confidence,
                             model_version, features, ...}; 400 with the
                             dead-letter kind, field and message for a bad
                             record (`stale`: an update outside the
                             declared freshness); 409 an update that would
                             rewrite a stored record; 500 the entity's
                             stored state is not the documented JSON; 503
                             the store is down or slower than its timeout,
                             or --max_waiting requests are waiting
  GET  /healthz              200 when the store answers, else 503
  GET  /metrics              Prometheus text format

A thin shell: it parses the flags, checks everything a request will need
(declaration, side tables, store, model) and serves the application of
pipelines/serving/ (app: the routes and the one error handler; scorer:
validation, features, model; store: the asynchronous online store;
batcher: requests scored together; champion: the registry follower) on
uvicorn, --workers processes on one port.

Exit codes: 2 for bad flags, a store that does not answer, a model that
fails verification, a side table that cannot be read or a declaration
the service cannot serve, each one line on stderr before anything is
served.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

from pipelines.base.errors import UsageError
from pipelines.cli.shell import run_command
from pipelines.model.registry import Registry
from pipelines.serving.app import make_app
from pipelines.serving.champion import ChampionFollower
from pipelines.serving.loading import freeze_heap, load_model
from pipelines.serving.model_process import ModelProcess
from pipelines.serving.scorer import Scorer
from pipelines.serving.store import RequestStore, check_store
from schemas.dataset import load_dataset
from transforms import online_store
from transforms.parse import rfc3339_to_micros
from transforms.side_tables import load_side_tables, side_table_paths

# uvicorn on libuv's event loop and httptools' C parser (pinned in
# setup.py), not asyncio's loop and the pure-Python h11: every request
# pays for parsing and writing HTTP on the one event loop, which shares
# the GIL with the model thread. Named, not uvicorn's 'auto' (which falls
# back silently when one is missing).
SERVER = dict(loop='uvloop', http='httptools')

# The command line, for the worker processes of --workers N (each builds
# its own application from it: see worker_app).
ARGV_ENV = 'MLPIPE_SERVE_ARGV'


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse_flags(argv: Optional[List[str]]) -> argparse.Namespace:
  p = _Parser(prog='python -m pipelines.serve',
              description='Score raw records over HTTP from the online store.')
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument('--registry', help='Serve the champion of this model '
                     'registry (see pipelines.registry).')
  model.add_argument('--model_dir', help='Serve this model directory.')
  p.add_argument('--online_store', required=True,
                 help='redis://host:port/db of the online store.')
  p.add_argument('--schema', default='transactions',
                 help='Dataset declaration: a name in schemas/ or a .yaml.')
  p.add_argument('--side_table', action='append', default=None,
                 help='NAME=PATH: read the declared side table NAME from '
                 'PATH, not the declaration\'s path (as for pipelines.batch; '
                 'repeat for several). Joined to each request by its key.')
  p.add_argument('--workers', type=int, default=1,
                 help='Serving processes sharing the port (uvicorn\'s '
                 'workers; e.g. one per core): each loads the model and '
                 'batches its own requests.')
  p.add_argument('--host', default='127.0.0.1')
  p.add_argument('--port', type=int, default=8080)
  p.add_argument('--store_timeout_ms', type=int, default=100,
                 help='Socket timeout of each store call: a store slower '
                 'than this answers 503.')
  p.add_argument('--max_records', type=int,
                 default=online_store.DEFAULT_MAX_RECORDS,
                 help='Records kept per entity when ?update=true appends.')
  p.add_argument('--reference_time', default=None,
                 help='RFC 3339 "now" against which an update\'s event '
                 'time is held to the declared freshness (default: the '
                 'wall clock at each request; a fixed instant replays '
                 'old records).')
  p.add_argument('--max_waiting', type=int, default=256,
                 help='/score requests in the service at once, at most: '
                 'one more is answered 503 at once (Retry-After: 1).')
  p.add_argument('--batch_window_ms', type=float, default=0.0,
                 help='After the first request of a batch, wait this long '
                 'for more (requests arriving while a batch is scored join '
                 'the next one anyway).')
  p.add_argument('--max_batch_rows', type=int, default=64,
                 help='Requests scored together in one model call, at most.')
  p.add_argument('--scoring', choices=('process', 'thread'),
                 default='process',
                 help='Where the model scores: a process of its own beside '
                 'each serving process (default; the two use two cores), '
                 'or a thread of the serving process (one process, one '
                 'GIL: less memory, a slower tail under load).')
  p.add_argument('--model_processes', type=int, default=1,
                 help='With --scoring process: model processes per serving '
                 'process; a batch goes to one that is free.')
  p.add_argument('--model_poll_seconds', type=float, default=None,
                 help='With --registry: look for a new champion this often '
                 'and serve it without a restart (default 10; 0: never).')
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    raise UsageError(f'--port {args.port}: give a port in 1..65535')
  if args.store_timeout_ms <= 0 or args.max_records <= 0:
    raise UsageError('--store_timeout_ms and --max_records must be positive')
  if args.workers <= 0:
    raise UsageError('--workers must be positive')
  if args.model_processes <= 0:
    raise UsageError('--model_processes must be positive')
  if args.max_waiting <= 0:
    raise UsageError('--max_waiting must be positive')
  args.reference_micros = None
  if args.reference_time is not None:
    try:
      args.reference_micros = rfc3339_to_micros(args.reference_time)
    except ValueError as e:
      raise UsageError(f'--reference_time: {e}') from None
  if args.batch_window_ms < 0 or args.max_batch_rows <= 0:
    raise UsageError('--batch_window_ms must be >= 0 and --max_batch_rows '
                     'positive')
  if args.model_poll_seconds is None:
    args.model_poll_seconds = 10.0 if args.registry else 0.0
  elif args.model_poll_seconds and not args.registry:
    raise UsageError('--model_poll_seconds follows a registry\'s champion: '
                     'give --registry, not --model_dir')
  elif args.model_poll_seconds < 0:
    raise UsageError('--model_poll_seconds must be >= 0')
  try:
    online_store.check_url(args.online_store)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return args


def build_app(args: argparse.Namespace):
  """The application the command serves, after checking everything a
  request will need (the declaration, side tables, the store, the model);
  raises UsageError, SchemaError, StoreError, RegistryError or
  ModelIntegrityError."""
  dataset = load_dataset(args.schema)
  if not dataset.histories:
    raise UsageError(f'{dataset.name} declares no history: the online '
                     'store has nothing to serve')
  side_tables = load_side_tables(dataset, side_table_paths(args, dataset))
  timeout = args.store_timeout_ms / 1000
  check_store(args.online_store, dataset, timeout)
  model_dir = args.model_dir or Registry(args.registry).champion_dir()
  try:
    scorer = Scorer(dataset, load_model(model_dir), side_tables,
                    args.reference_micros)
  except UsageError as e:
    raise UsageError(f'{model_dir}: {e}') from None
  scorer.warm_up()
  freeze_heap()
  store = RequestStore(args.online_store, dataset, timeout=timeout,
                       max_records=args.max_records,
                       max_connections=args.max_waiting)
  follow = bool(args.registry and args.model_poll_seconds)
  processes, follower = [], None
  if args.scoring == 'process':
    # Started by the application's lifespan, in the process that serves
    # (not in --workers' supervisor, which builds this only to check).
    processes = [ModelProcess(args.schema, model_dir=args.model_dir,
                              registry=args.registry,
                              poll_seconds=args.model_poll_seconds)
                 for _ in range(args.model_processes)]
  elif follow:
    follower = ChampionFollower(scorer, args.registry,
                                args.model_poll_seconds)
  return make_app(scorer, store, batch_window=args.batch_window_ms / 1000,
                  max_batch_rows=args.max_batch_rows,
                  max_waiting=args.max_waiting, follower=follower,
                  processes=processes)


def worker_app():
  """The application of one worker process of --workers N (uvicorn's
  factory), from the command line the supervisor checked."""
  return build_app(parse_flags(json.loads(os.environ[ARGV_ENV])))


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    try:
      parse_flags(['--help'])
    except SystemExit:
      return 0
  def start():
    try:
      args = parse_flags(argv)
      return args, build_app(args)
    except OSError as e:       # a model or side table that cannot be read
      raise UsageError(str(e)) from None
  started = run_command(start)
  if isinstance(started, int):
    return started
  args, app = started
  import uvicorn  # pylint: disable=g-import-not-at-top
  print(f'Serving model {app.state.scorer.version} on '
        f'http://{args.host}:{args.port} '
        f'(online store {online_store.shown_url(args.online_store)}'
        f'{f", {args.workers} workers" if args.workers > 1 else ""})',
        file=sys.stderr, flush=True)
  if args.workers == 1:
    uvicorn.run(app, host=args.host, port=args.port, log_level='warning',
                access_log=False, **SERVER)
    return 0
  # Everything was checked above, in this process; each worker (a fresh
  # interpreter, uvicorn's supervisor restarts one that dies) builds its
  # own application from the same command line.
  os.environ[ARGV_ENV] = json.dumps(argv)
  uvicorn.run('pipelines.serve:worker_app', factory=True,
              workers=args.workers, host=args.host, port=args.port,
              log_level='warning', access_log=False, **SERVER)
  return 0


if __name__ == '__main__':
  sys.exit(main())
