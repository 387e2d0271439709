"""The scoring service: score one raw record now, from the online store.

    python -m pipelines.serve --registry data/registry \\
        --online_store redis://127.0.0.1:6379/0 --port 8080

  POST /score[?update=true]  a raw record (JSON object) -> 200 {score,
                             predicted_label, risk_category, confidence,
                             model_version, features, ...}; 400 with the
                             dead-letter kind, field and message for a bad
                             record; 503 when the store is down or slow
  GET  /healthz              200 when the store answers, else 503
  GET  /metrics              Prometheus text format

Per request, the same code as batch and streaming: `RecordValidator`
(through `decode_message`, the streaming source's decoder) validates the
record; the declared side tables (read and validated at start-up, as the
batch job reads them; --side_table NAME=PATH) are joined by key; the
entity's stored records (transforms.online_store) and the record go
through `history_features`, so its features are those the batch job gives
it when the store holds its history; the model directory's transform
graph and estimator score the row (`predict_table`). With `?update=true`
the record and its features are merged into the store afterwards (the
same script as the batch and streaming writers).

The web framework is Starlette on uvicorn: a small, well-kept ASGI
toolkit (FastAPI is built on it) with a test client, and nothing we do
not use. A request is prepared (validation, store read, features) on the
event loop; rows of concurrent requests are then scored together in one
graph and model call on a worker thread (`Batcher`), while the loop reads
the next requests. The store's socket timeouts (--store_timeout_ms) bound
how long a request can wait for Redis. With --registry the champion is
polled (--model_poll_seconds) and a new one served without a restart
(`ChampionFollower`).

Exit codes: 2 for bad flags, a store that does not answer, a model that
fails verification, a side table that cannot be read or a declaration
the service cannot serve, each one line on stderr before anything is
served.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

import pyarrow as pa

from pipelines.cli.shell import run_command
from pipelines.base.errors import UsageError
from pipelines.model.registry import Registry, RegistryError
from schemas.dataset import Dataset, SchemaError, load_dataset
from transforms import online_store
from transforms.common import micros_to_rfc3339
from transforms.history_features import history_features
from transforms.inference import (LoadedModel, ModelIntegrityError,
                                  TransformedSklearnModelHandler,
                                  input_types, predict_table)
from transforms.parse import RecordError, RecordValidator
from transforms.read import InputError
from transforms.stream_sources import decode_message
from transforms.side_tables import load_side_tables, side_table_paths

SOURCE = 'request'
# The command line, for the worker processes of --workers N (each builds
# its own application from it: see worker_app).
ARGV_ENV = 'MLPIPE_SERVE_ARGV'




# Scoring ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Serving:
  """The model being served and what scoring needs of it: replaced whole
  (one attribute assignment), so a request, or a batch of requests, is
  scored and labelled by one model."""
  model: LoadedModel
  version: str
  id_field: str
  schema: pa.Schema


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What a request brings to a batch: its validated record, the side
  tables' columns joined to it, and per declared history (entity field)
  its entity's stored records but a stored copy of this very record."""
  record: Dict[str, Any]
  joined: Dict[str, Any]
  history: Dict[str, List[Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Scored:
  """What a batch gives each of its requests back."""
  features: Dict[str, Any]
  used: Dict[str, int]
  prediction: Dict[str, Any]


class Scorer:
  """Raw record bytes -> the response body of /score, in three steps:
  `prepare` (one request: validation, side tables, store read), `predict`
  (one or more requests: history features, one transform graph and one
  model call), `answer` (one request: the response, the store update).

  Raises RecordError (a bad record), redis-py's RedisError (the store) or
  online_store.StoreError (a stored value that is not ours)."""

  def __init__(self, dataset: Dataset, model: LoadedModel,
               store: online_store.OnlineStore,
               side_tables: Optional[Dict[str, pa.Table]] = None):
    self.dataset, self.store = dataset, store
    self.validator = RecordValidator(dataset)
    self.serving = self._serving(model)
    # Each side table as {key value: its other columns}, in declaration
    # order: the batch job's join (`join_side_table`, pyarrow's index_in)
    # as a dict look-up, nulls for a key the table lacks.
    self.side = []
    for name, table in (side_tables or {}).items():
      key = dataset.side_tables[name]['key']
      others = [n for n in table.column_names if n != key]
      rows = table.select(others).to_pylist()
      self.side.append((key, others, dict(zip(
          table.column(key).to_pylist(), rows))))

  @property
  def version(self) -> str:
    return self.serving.version

  def _serving(self, model: LoadedModel) -> Serving:
    metadata = model.metadata
    wanted = set(metadata['raw_features'])
    missing = sorted(wanted - set(self.dataset.feature_types()))
    if missing:
      raise UsageError(f'model {metadata["model_version"]} needs '
                       f'{missing[0]}, which {self.dataset.name} does not '
                       'make')
    id_field = metadata.get('id_field') or self.dataset.id_field
    return Serving(model, metadata['model_version'], id_field,
                   pa.schema(input_types(metadata, id_field).items()))

  def swap(self, model: LoadedModel):
    """Serves `model` from the next batch on, after checking it scores
    this dataset's rows and warming it up (requests in flight finish with
    the model they started with)."""
    serving = self._serving(model)
    self._warm_up(serving)
    self.serving = serving

  def features(self, items: Sequence[Prepared]
               ) -> List[Tuple[Dict[str, Any], Dict[str, int]]]:
    """(history features, stored records used per entity field) of each
    request, as batch computes them: `history_features` over its entity's
    stored records and the record. An entity the store does not know has
    an empty history.

    One call per declared history for all the requests: each request's
    rows go in under an entity value of their own (its position), so the
    windows of one never hold another's records (two requests for one
    user included); the features depend on the grouping, not on the
    entity's value. The parity tests check they equal the batch job's."""
    out = [({}, {}) for _ in items]
    for spec in self.dataset.histories:
      entity = spec.entity
      as_int = self.dataset.fields[entity].type == 'int'
      rows, ends = [], []
      for i, item in enumerate(items):
        tag = {entity: i if as_int else str(i)}
        rows.extend(dict(r, **tag) for r in item.history[entity])
        rows.append(dict(item.record, **tag))
        ends.append(len(rows) - 1)
      features = history_features(rows, self.dataset, spec)
      for i, (item, end) in enumerate(zip(items, ends)):
        out[i][0].update(features[end])
        out[i][1][entity] = len(item.history[entity])
    return out

  def warm_up(self):
    self._warm_up(self.serving)

  @staticmethod
  def _warm_up(serving: Serving):
    """Scores one made-up row (empty strings, zeros) before serving, so
    the first request does not pay for loading kernels."""
    defaults = {pa.string(): '', pa.float64(): 0.0, pa.int64(): 0}
    row = {f.name: defaults.get(f.type) for f in serving.schema}
    predict_table(serving.model, pa.Table.from_pylist(
        [row], schema=serving.schema), serving.id_field)

  def join(self, record: Dict[str, Any]) -> Dict[str, Any]:
    """The side tables' columns of the record (None where its key is not
    in a table), as the batch job joins them."""
    joined = {}
    for key, others, rows in self.side:
      row = rows.get(record[key])
      joined.update((n, None if row is None else row[n]) for n in others)
    return joined

  def prepare(self, body: bytes) -> Prepared:
    """Validation, side tables and one store round trip (one request)."""
    record = self.validator.validate(decode_message(body, SOURCE))
    rid = record[self.dataset.id_field]
    states = self.store.state(record)
    history = {e: [r for r in stored if r.get(self.dataset.id_field) != rid]
               for e, (stored, _) in states.items()}
    return Prepared(record, self.join(record), history)

  def predict(self, items: Sequence[Prepared]) -> List[Scored]:
    """The features and prediction of each request, in order: history
    features (`features`), then one graph and one estimator call by one
    model (rows are padded to a multiple of PAD_ROWS, so a row's score
    does not depend on the rows scored with it)."""
    found = self.features(items)
    serving = self.serving
    table = pa.Table.from_pylist(
        [dict(item.record, **item.joined, **features)
         for item, (features, _) in zip(items, found)], schema=serving.schema)
    predictions = predict_table(serving.model, table,
                                serving.id_field).to_pylist()
    for prediction in predictions:
      prediction.pop('scored_at', None)
    return [Scored(features, used, prediction)
            for (features, used), prediction in zip(found, predictions)]

  def answer(self, prepared: Prepared, scored: Scored,
             update: bool = False) -> Dict[str, Any]:
    """The response body; with `update`, the record and its features
    merged into the store first."""
    record = prepared.record
    if update:
      self.store.append(record, scored.features,
                        scored.prediction['model_version'])
    ts = self.dataset.timestamp_field
    return dict(scored.prediction, id=record[self.dataset.id_field],
                event_time=micros_to_rfc3339(record[ts]),
                features=scored.features, history_records=scored.used,
                side_tables=prepared.joined, updated=update)

  def score(self, body: bytes, update: bool = False) -> Dict[str, Any]:
    """One request on its own (no batching)."""
    prepared = self.prepare(body)
    return self.answer(prepared, self.predict([prepared])[0], update)


class Batcher:
  """Scores concurrent requests together.

  A request's handler prepares it on the event loop (validation, store
  read) and awaits `score(item)`; items wait in a list while the model
  thread scores the previous batch (and `window` seconds more after the
  first, if set); then up to `max_rows` of them go to `predict` in one
  call on one worker thread (`Scorer.predict`: history features, the
  transform graph and the estimator, each once per batch), and each
  handler gets its own result back. One call per batch pays the fixed
  cost of each step once (a one-row model call costs about what a 16-row
  call costs), and the event loop keeps reading and preparing requests
  while the model thread scores.
  """

  def __init__(self, predict, *, window: float = 0.0, max_rows: int = 64,
               observe=None):
    self._predict, self._window, self._max = predict, window, max_rows
    self._observe = observe or (lambda rows: None)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='mlpipe-score')
    self._pending: List[Tuple[Dict[str, Any], asyncio.Future]] = []
    self._task: Optional[asyncio.Task] = None

  async def score(self, row: Dict[str, Any]) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._pending.append((row, future))
    # One draining task at a time; it ends when nothing waits (so a test
    # client's short-lived event loops leave no task behind).
    if self._task is None or self._task.done():
      self._task = loop.create_task(self._drain())
    return await future

  async def _drain(self):
    loop = asyncio.get_running_loop()
    while self._pending:
      if self._window:
        await asyncio.sleep(self._window)
      batch = self._pending[:self._max]
      del self._pending[:len(batch)]
      self._observe(len(batch))
      try:
        predictions = await loop.run_in_executor(
            self._pool, self._predict, [row for row, _ in batch])
      except Exception as e:  # pylint: disable=broad-except
        # Every request of the batch fails as the call did (a 500 each).
        for _, future in batch:
          if not future.done():
            future.set_exception(e)
        continue
      for (_, future), prediction in zip(batch, predictions):
        if not future.done():
          future.set_result(prediction)


class ChampionFollower:
  """Follows a registry's champion without a restart: `check` reads the
  registry's index (written whole and renamed, so never half of one) and,
  when its champion is not the version served, loads that model with the
  verified loader (hashes, signature, skops: nothing in the folder runs)
  and swaps it in. A champion that cannot be read or fails verification
  leaves the current model serving; the reason is kept (`error`), said
  once on stderr, and the next poll tries again. `start` polls every
  `seconds` on a daemon thread until `stop`."""

  def __init__(self, scorer: Scorer, registry: str, seconds: float):
    self.scorer, self.registry, self.seconds = scorer, registry, seconds
    self.swaps, self.failures, self.error = 0, 0, None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def check(self) -> Optional[str]:
    """One poll: the version now served if it changed, else None."""
    try:
      registry = Registry(self.registry)
      champion = registry.champion()
      if champion is None or champion['version'] == self.scorer.version:
        self.error = None
        return None
      model = load_model(registry.champion_dir())
      if model.metadata['model_version'] != champion['version']:
        raise ModelIntegrityError(
            f'{registry.champion_dir()} holds model '
            f'{model.metadata["model_version"]}, the index says '
            f'{champion["version"]}')
      self.scorer.swap(model)
    except (RegistryError, ModelIntegrityError, UsageError, OSError,
            ValueError, KeyError) as e:
      self.failures += 1
      message = f'champion not loaded, still serving {self.scorer.version}:' \
                f' {e}'
      if message != self.error:
        print(f'warning: {message}', file=sys.stderr, flush=True)
      self.error = message
      return None
    self.swaps += 1
    self.error = None
    print(f'Serving model {self.scorer.version} (the champion of '
          f'{self.registry})', file=sys.stderr, flush=True)
    freeze_heap()
    return self.scorer.version

  def start(self):
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='mlpipe-champion')
    self._thread.start()

  def _run(self):
    while not self._stop.wait(self.seconds):
      self.check()

  def stop(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None


# The web application ----------------------------------------------------------
def make_app(scorer: Scorer, store_url: str, *, batch_window: float = 0.0,
             max_batch_rows: int = 64,
             follower: Optional[ChampionFollower] = None):
  """The Starlette application around a Scorer, with its own Prometheus
  registry (so several apps can live in one process, as in the tests).
  Requests are scored in batches (`Batcher`); a `follower` polls while
  the application runs (its lifespan: uvicorn's, or a test client's
  `with` block)."""
  import prometheus_client as prom  # pylint: disable=g-import-not-at-top
  import redis  # pylint: disable=g-import-not-at-top
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse, Response  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top

  metrics = prom.CollectorRegistry()
  requests = prom.Counter('mlpipe_serve_requests', 'Requests by route and '
                          'status code', ['route', 'code'], registry=metrics)
  latency = prom.Histogram(
      'mlpipe_serve_score_seconds', 'Time to answer POST /score',
      buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1.0),
      registry=metrics)
  bad = prom.Counter('mlpipe_serve_bad_records', 'Records refused, by '
                     'dead-letter kind', ['kind'], registry=metrics)
  store_errors = prom.Counter('mlpipe_serve_store_errors', 'Requests that '
                              'failed on the online store', registry=metrics)
  info = prom.Gauge('mlpipe_serve_model_info', 'The model being served',
                    ['model_version'], registry=metrics)
  batch_rows = prom.Histogram(
      'mlpipe_serve_batch_rows', 'Requests scored per model call',
      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=metrics)
  if follower is not None:
    prom.Gauge('mlpipe_serve_model_swaps', 'Champion changes followed '
               'since start', registry=metrics).set_function(
                   lambda: follower.swaps)
    prom.Gauge('mlpipe_serve_model_swap_failures', 'Polls that found a '
               'champion it could not load', registry=metrics).set_function(
                   lambda: follower.failures)
  shown = online_store.shown_url(store_url)
  batcher = Batcher(scorer.predict, window=batch_window,
                    max_rows=max_batch_rows, observe=batch_rows.observe)

  def unavailable(e: Exception) -> JSONResponse:
    store_errors.inc()
    return JSONResponse({'error': f'online store {shown} unavailable: '
                                  f'{online_store._reason(e)}'},  # pylint: disable=protected-access
                        status_code=503)

  async def score(request):
    start = time.perf_counter()
    body = await request.body()
    update = request.query_params.get('update', 'false').lower() in (
        'true', '1', 'yes')
    try:
      prepared = scorer.prepare(body)
      scored = await batcher.score(prepared)
      response = JSONResponse(scorer.answer(prepared, scored, update))
    except RecordError as e:
      bad.labels(e.kind).inc()
      response = JSONResponse({'error_kind': e.kind, 'field': e.field,
                               'message': e.message}, status_code=400)
    except redis.RedisError as e:
      response = unavailable(e)
    except online_store.StoreError as e:
      response = JSONResponse({'error': str(e)}, status_code=500)
    requests.labels('/score', str(response.status_code)).inc()
    latency.observe(time.perf_counter() - start)
    return response

  async def healthz(request):
    try:
      scorer.store.client.ping()
      response = JSONResponse({'status': 'ok',
                               'model_version': scorer.version,
                               'online_store': shown,
                               'worker': os.getpid()})
    except redis.RedisError as e:
      response = unavailable(e)
    requests.labels('/healthz', str(response.status_code)).inc()
    return response

  async def prometheus(request):
    info.clear()
    info.labels(scorer.version).set(1)
    return Response(prom.generate_latest(metrics),
                    media_type=prom.CONTENT_TYPE_LATEST)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if follower is not None:
      follower.start()
    try:
      yield
    finally:
      if follower is not None:
        follower.stop()

  app = Starlette(routes=[
      Route('/score', score, methods=['POST']),
      Route('/healthz', healthz, methods=['GET']),
      Route('/metrics', prometheus, methods=['GET'])], lifespan=lifespan)
  app.state.scorer = scorer
  return app


# Start-up ---------------------------------------------------------------------
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
  p.add_argument('--batch_window_ms', type=float, default=0.0,
                 help='After the first request of a batch, wait this long '
                 'for more (requests arriving while a batch is scored join '
                 'the next one anyway).')
  p.add_argument('--max_batch_rows', type=int, default=64,
                 help='Requests scored together in one model call, at most.')
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


_TF_TYPES = {'string': 'string', 'float': 'float32', 'int': 'int64',
             'timestamp': 'int64'}


def load_model(model_dir: str) -> LoadedModel:
  """The project's verified loader: hashes, signature and skops' safe
  format are checked before anything in the folder is loaded. The
  transform layer is then traced once into a concrete function of fixed
  signature (every raw feature a [rows] tensor, of the types
  `raw_feature_tensors` makes; an optional one a [rows, 1] sparse
  tensor): the same graph, called without eager dispatch or tf.function's
  per-call signature matching, which cost more than the graph on a small
  batch. The parity tests check the scores equal the batch job's."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = TransformedSklearnModelHandler(model_dir).load_model()
  metadata = model.metadata
  optional = set(metadata.get('optional_features', ()))
  spec = {}
  for name, ftype in metadata['raw_features'].items():
    dtype = tf.as_dtype(_TF_TYPES[ftype])
    spec[name] = (tf.SparseTensorSpec([None, 1], dtype) if name in optional
                  else tf.TensorSpec([None], dtype))
  graph = tf.function(model.transform_layer).get_concrete_function(spec)
  return dataclasses.replace(model, transform_layer=graph)


def build_scorer(args: argparse.Namespace) -> Scorer:
  """Checks everything a request will need; raises UsageError,
  SchemaError, StoreError, RegistryError or ModelIntegrityError."""
  dataset = load_dataset(args.schema)
  if not dataset.histories:
    raise UsageError(f'{dataset.name} declares no history: the online '
                     'store has nothing to serve')
  side_tables = load_side_tables(dataset, side_table_paths(args, dataset))
  timeout = args.store_timeout_ms / 1000
  online_store.ping(args.online_store, timeout)
  client = online_store.connect(args.online_store, timeout)
  meta = client.hgetall(online_store.Keys(dataset, dataset.histories[0]).meta)
  stored = meta.get(b'dataset')
  if stored is not None and stored.decode() != dataset.name:
    raise UsageError(f'--online_store holds {stored.decode()}, not '
                     f'{dataset.name}')
  model_dir = args.model_dir or Registry(args.registry).champion_dir()
  model = load_model(model_dir)
  store = online_store.OnlineStore(client, dataset, args.max_records)
  try:
    scorer = Scorer(dataset, model, store, side_tables)
  except UsageError as e:
    raise UsageError(f'{model_dir}: {e}') from None
  scorer.warm_up()
  return scorer


def freeze_heap():
  """Moves every object alive now (TensorFlow, the model, the side
  tables: ~600k objects) out of reach of the garbage collector's full
  collections, which would otherwise walk them all now and then, a
  pause of ~0.5 s on a busy machine in the middle of requests (the p99).
  Called once the model is loaded, and after a champion swap (unfrozen,
  collected, frozen again, so the old model's cycles are freed: one such
  pause per swap)."""
  gc.unfreeze()
  gc.collect()
  gc.freeze()


def build_app(args: argparse.Namespace):
  """The application the command serves (build_scorer's errors)."""
  scorer = build_scorer(args)
  freeze_heap()
  follower = (ChampionFollower(scorer, args.registry, args.model_poll_seconds)
              if args.registry and args.model_poll_seconds else None)
  return make_app(scorer, args.online_store,
                  batch_window=args.batch_window_ms / 1000,
                  max_batch_rows=args.max_batch_rows, follower=follower)


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
                access_log=False)
    return 0
  # Everything was checked above, in this process; each worker (a fresh
  # interpreter, uvicorn's supervisor restarts one that dies) builds its
  # own application from the same command line.
  os.environ[ARGV_ENV] = json.dumps(argv)
  uvicorn.run('pipelines.serving.service:worker_app', factory=True,
              workers=args.workers, host=args.host, port=args.port,
              log_level='warning', access_log=False)
  return 0


if __name__ == '__main__':
  sys.exit(main())
