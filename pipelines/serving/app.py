"""The HTTP shell over the scorer and the store (Starlette): routes that
call the library, one place that maps its errors to HTTP answers, and
the metrics.

  POST /score[?update=true]   Scorer.validate -> RequestStore.records ->
                              Scorer.prepare -> Batcher (model thread) ->
                              [RequestStore.add] -> Scorer.answer
  GET  /healthz               RequestStore.ping
  GET  /metrics               Prometheus text

No endpoint catches an error: the project's errors carry their HTTP status
(pipelines.base.errors) and `answer_error` turns each into its answer and
its count; a bad record answers with its dead-letter row. Nothing blocks
the event loop: the store is asynchronous and bounded by its timeout, the
model runs on its own thread. At most `max_waiting` /score requests are
in the service at once; one more is a 503 (`Busy`, Retry-After: 1) at
once, so a stalled store or model cannot pile requests up without bound.
"""

import asyncio
import contextlib
import os
import time
from typing import Optional, Sequence

from pipelines.base.errors import ProjectError, RunError
from pipelines.serving import model_process
from pipelines.serving.batcher import Batcher
from pipelines.serving.champion import ChampionFollower
from pipelines.serving.scorer import Scorer
from pipelines.serving.store import (RequestStore, StoreUnavailable,
                                     UpdateConflict)
from transforms.online_store import BadStoredValue
from transforms.parse import RecordError

ROUTES = ('/score', '/healthz')


class Busy(RunError):
  """More /score requests are waiting than --max_waiting allows."""
  http_status = 503
  retry_after = 1


def is_update(request) -> bool:
  return request.query_params.get('update', 'false').lower() in (
      'true', '1', 'yes')


def make_app(scorer: Scorer, store: RequestStore, *,
             batch_window: float = 0.0, max_batch_rows: int = 64,
             max_waiting: int = 256,
             follower: Optional[ChampionFollower] = None,
             processes: Sequence[model_process.ModelProcess] = ()):
  """The Starlette application around a Scorer and a RequestStore, with
  its own Prometheus registry (so several apps can live in one process,
  as in the tests). Requests are scored in batches (`Batcher`), on a
  thread by `scorer`'s model, or in `processes` (model processes, each
  with its own model, following the registry there if asked; /healthz
  and /metrics report the first's). A `follower` polls, and `processes`
  run, while the application runs (its lifespan: uvicorn's, or a test
  client's `with` block)."""
  import prometheus_client as prom  # pylint: disable=g-import-not-at-top
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
  counted = {
      StoreUnavailable: prom.Counter(
          'mlpipe_serve_store_errors', 'Requests that failed on the online '
          'store', registry=metrics),
      UpdateConflict: prom.Counter(
          'mlpipe_serve_update_conflicts', 'Updates refused: the record id '
          'is stored with other values', registry=metrics),
      BadStoredValue: prom.Counter(
          'mlpipe_serve_bad_stored_states', 'Requests whose entity\'s '
          'stored state is not the documented JSON', registry=metrics),
      Busy: prom.Counter(
          'mlpipe_serve_busy', 'Requests refused because --max_waiting '
          'requests were waiting', registry=metrics)}
  info = prom.Gauge('mlpipe_serve_model_info', 'The model being served',
                    ['model_version'], registry=metrics)
  batch_rows = prom.Histogram(
      'mlpipe_serve_batch_rows', 'Requests scored per model call',
      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=metrics)
  waiting_now = prom.Gauge('mlpipe_serve_waiting', '/score requests in the '
                           'service now', registry=metrics)
  swaps = prom.Gauge('mlpipe_serve_model_swaps', 'Champion changes '
                     'followed since start', registry=metrics)
  swap_failures = prom.Gauge('mlpipe_serve_model_swap_failures', 'Polls '
                             'that found a champion it could not load',
                             registry=metrics)
  if processes:
    prom.Gauge('mlpipe_serve_model_process_restarts', 'Model processes '
               'started again after one died', registry=metrics
               ).set_function(lambda: sum(p.restarts for p in processes))
  batcher = Batcher(scorer.predict, window=batch_window,
                    max_rows=max_batch_rows, observe=batch_rows.observe,
                    processes=processes)
  waiting = [0]

  async def served():
    """(model version served, champion swaps, failed polls)."""
    if processes:
      return await processes[0].status()
    if follower is not None:
      return scorer.version, follower.swaps, follower.failures
    return scorer.version, 0, 0

  async def score(request):
    if waiting[0] >= max_waiting:
      raise Busy(f'busy: {max_waiting} requests are waiting '
                 '(--max_waiting); try again')
    waiting[0] += 1
    waiting_now.inc()
    try:
      body = await request.body()
      update = is_update(request)
      record = scorer.validate(body, update)
      prepared = scorer.prepare(record, await store.records(record), update)
      scored = await batcher.score(prepared)
      if update:
        await store.add(record, scored.features,
                        scored.prediction['model_version'])
      return JSONResponse(scorer.answer(prepared, scored, update))
    finally:
      waiting[0] -= 1
      waiting_now.dec()

  async def healthz(request):
    await store.ping()
    version, _, _ = await served()
    return JSONResponse({'status': 'ok', 'model_version': version,
                         'online_store': store.shown,
                         'worker': os.getpid()})

  async def prometheus(request):
    version, swapped, failed = await served()
    info.clear()
    info.labels(version).set(1)
    swaps.set(swapped)
    swap_failures.set(failed)
    return Response(prom.generate_latest(metrics),
                    media_type=prom.CONTENT_TYPE_LATEST)

  async def answer_error(request, error: ProjectError):
    """The one place the library's errors become HTTP answers."""
    if isinstance(error, RecordError):
      bad.labels(error.kind).inc()
      return JSONResponse({'error_kind': error.kind, 'field': error.field,
                           'message': error.message}, status_code=400)
    for kind, counter in counted.items():
      if isinstance(error, kind):
        counter.inc()
    retry = getattr(error, 'retry_after', None)
    return JSONResponse(
        {'error': str(error)}, status_code=error.http_status,
        headers={'Retry-After': str(retry)} if retry else None)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    # Until every child's model answers: no request comes first.
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(None, process.start)
                           for process in processes))
    if follower is not None:
      follower.start()
    try:
      yield
    finally:
      if follower is not None:
        follower.stop()
      for process in processes:
        process.stop()

  app = Starlette(routes=[
      Route('/score', score, methods=['POST']),
      Route('/healthz', healthz, methods=['GET']),
      Route('/metrics', prometheus, methods=['GET'])],
      exception_handlers={ProjectError: answer_error}, lifespan=lifespan)
  app.add_middleware(_Metered, requests=requests, latency=latency)
  app.state.scorer = scorer
  app.state.processes = processes
  return app


class _Metered:
  """ASGI middleware: counts each /score and /healthz answer by route and
  status code (errors included, as `answer_error` answered them) and
  times /score."""

  def __init__(self, app, requests, latency):
    self.app, self.requests, self.latency = app, requests, latency

  async def __call__(self, scope, receive, send):
    path = scope.get('path')
    if scope['type'] != 'http' or path not in ROUTES:
      return await self.app(scope, receive, send)
    start, status = time.perf_counter(), [500]

    async def sending(message):
      if message['type'] == 'http.response.start':
        status[0] = message['status']
      await send(message)

    try:
      await self.app(scope, receive, sending)
    finally:
      self.requests.labels(path, str(status[0])).inc()
      if path == '/score':
        self.latency.observe(time.perf_counter() - start)
