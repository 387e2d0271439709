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
record; the entity's stored records (transforms.online_store) and the
record go through `history_features`, so its features are those the batch
job gives it when the store holds its history; the model directory's
transform graph and estimator score the one-row table (`predict_table`).
With `?update=true` the record and its features are merged into the store
afterwards (the same script as the batch and streaming writers).

The web framework is Starlette on uvicorn: a small, well-kept ASGI
toolkit (FastAPI is built on it) with a test client, and nothing we do
not use. A request's work is short and CPU-bound, so the handler runs it
on the event loop; the store's socket timeouts (--store_timeout_ms) bound
how long a request can wait for Redis.

Exit codes: 2 for bad flags, a store that does not answer, a model that
fails verification or a declaration the service cannot serve, each one
line on stderr before anything is served.
"""

import argparse
import dataclasses
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import pipelines.quiet  # noqa: F401  (first: silences TensorFlow)

import pyarrow as pa

from pipelines.registry import Registry, RegistryError
from schemas.dataset import Dataset, SchemaError, load_dataset
from transforms import online_store
from transforms.common import micros_to_rfc3339
from transforms.history import history_features
from transforms.inference import (LoadedModel, ModelIntegrityError,
                                  TransformedSklearnModelHandler,
                                  input_types, predict_table)
from transforms.parse import RecordError, RecordValidator
from transforms.read import decode_message

SOURCE = 'request'


class UsageError(ValueError):
  """A flag, the declaration or the model cannot be served (exit 2)."""


# Scoring ----------------------------------------------------------------------
class Scorer:
  """Raw record bytes -> the response body of /score.

  Raises RecordError (a bad record), redis-py's RedisError (the store) or
  online_store.StoreError (a stored value that is not ours)."""

  def __init__(self, dataset: Dataset, model: LoadedModel,
               store: online_store.OnlineStore):
    self.dataset, self.model, self.store = dataset, model, store
    self.validator = RecordValidator(dataset)
    metadata = model.metadata
    self.version = metadata['model_version']
    self.id_field = metadata.get('id_field') or dataset.id_field
    self.schema = pa.schema(input_types(metadata, self.id_field).items())

  def features(self, record: Dict[str, Any]
               ) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """(the record's history features, stored records used per entity
    field), as batch computes them: `history_features` over the entity's
    stored records (but a stored copy of this very record) and the record
    itself. An entity the store does not know has an empty history."""
    states = self.store.state(record)
    rid = record[self.dataset.id_field]
    features, used = {}, {}
    for spec in self.dataset.histories:
      stored, _ = states[spec.entity]
      history = [r for r in stored if r.get(self.dataset.id_field) != rid]
      features.update(history_features(history + [record], self.dataset,
                                       spec)[-1])
      used[spec.entity] = len(history)
    return features, used

  def warm_up(self):
    """Scores one made-up row (empty strings, zeros) before serving, so
    the first request does not pay for tracing the transform graph."""
    defaults = {pa.string(): '', pa.float64(): 0.0, pa.int64(): 0}
    row = {f.name: defaults.get(f.type) for f in self.schema}
    predict_table(self.model, pa.Table.from_pylist([row], schema=self.schema),
                  self.id_field)

  def score(self, body: bytes, update: bool = False) -> Dict[str, Any]:
    record = self.validator.validate(decode_message(body, SOURCE))
    found, counts = self.features(record)
    row = dict(record, **found)
    table = pa.Table.from_pylist([row], schema=self.schema)
    prediction = predict_table(self.model, table, self.id_field).to_pylist()[0]
    prediction.pop('scored_at', None)
    if update:
      self.store.append(record, found, self.version)
    ts = self.dataset.timestamp_field
    return dict(prediction, id=record[self.dataset.id_field],
                event_time=micros_to_rfc3339(record[ts]),
                features=found, history_records=counts, updated=update)


# The web application ----------------------------------------------------------
def make_app(scorer: Scorer, store_url: str):
  """The Starlette application around a Scorer, with its own Prometheus
  registry (so several apps can live in one process, as in the tests)."""
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
  info.labels(scorer.version).set(1)
  shown = online_store.shown_url(store_url)

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
      response = JSONResponse(scorer.score(body, update))
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
                               'online_store': shown})
    except redis.RedisError as e:
      response = unavailable(e)
    requests.labels('/healthz', str(response.status_code)).inc()
    return response

  async def prometheus(request):
    return Response(prom.generate_latest(metrics),
                    media_type=prom.CONTENT_TYPE_LATEST)

  return Starlette(routes=[
      Route('/score', score, methods=['POST']),
      Route('/healthz', healthz, methods=['GET']),
      Route('/metrics', prometheus, methods=['GET'])])


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
  p.add_argument('--host', default='127.0.0.1')
  p.add_argument('--port', type=int, default=8080)
  p.add_argument('--store_timeout_ms', type=int, default=100,
                 help='Socket timeout of each store call: a store slower '
                 'than this answers 503.')
  p.add_argument('--max_records', type=int,
                 default=online_store.DEFAULT_MAX_RECORDS,
                 help='Records kept per entity when ?update=true appends.')
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    raise UsageError(f'--port {args.port}: give a port in 1..65535')
  if args.store_timeout_ms <= 0 or args.max_records <= 0:
    raise UsageError('--store_timeout_ms and --max_records must be positive')
  try:
    online_store.check_url(args.online_store)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return args


def load_model(model_dir: str) -> LoadedModel:
  """The project's verified loader: hashes, signature and skops' safe
  format are checked before anything in the folder is loaded. The
  transform layer is wrapped in one `tf.function` (the same graph, traced
  once per padded batch shape): called eagerly it spends more time in
  Python than in the graph on a one-row request. The parity tests check
  the scores equal the batch job's."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = TransformedSklearnModelHandler(model_dir).load_model()
  return dataclasses.replace(model, transform_layer=tf.function(
      model.transform_layer, reduce_retracing=True))


def build_scorer(args: argparse.Namespace) -> Scorer:
  """Checks everything a request will need; raises UsageError,
  SchemaError, StoreError, RegistryError or ModelIntegrityError."""
  dataset = load_dataset(args.schema)
  if not dataset.histories:
    raise UsageError(f'{dataset.name} declares no history: the online '
                     'store has nothing to serve')
  if dataset.side_tables:
    raise UsageError(f'{dataset.name} joins side tables '
                     f'({", ".join(dataset.side_tables)}): the scoring '
                     'service does not join them yet')
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
  wanted = set(model.metadata['raw_features'])
  missing = sorted(wanted - set(dataset.feature_types()))
  if missing:
    raise UsageError(f'{model_dir}: the model needs {missing[0]}, which '
                     f'{dataset.name} does not make')
  store = online_store.OnlineStore(client, dataset, args.max_records)
  scorer = Scorer(dataset, model, store)
  scorer.warm_up()
  return scorer


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '-h' in argv or '--help' in argv:
    try:
      parse_flags(['--help'])
    except SystemExit:
      return 0
  try:
    args = parse_flags(argv)
    scorer = build_scorer(args)
  except (UsageError, SchemaError, online_store.StoreError, RegistryError,
          ModelIntegrityError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  import uvicorn  # pylint: disable=g-import-not-at-top
  print(f'Serving model {scorer.version} on http://{args.host}:{args.port} '
        f'(online store {online_store.shown_url(args.online_store)})',
        file=sys.stderr, flush=True)
  uvicorn.run(make_app(scorer, args.online_store), host=args.host,
              port=args.port, log_level='warning', access_log=False)
  return 0


if __name__ == '__main__':
  sys.exit(main())
