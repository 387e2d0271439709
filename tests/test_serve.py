"""The scoring service against the batch job: parity, bad input, faults.

One batch run (module scope) on 2,000 generated records with
--online_store trains a model, writes the feature rows and predictions and
materialises every user's state into a throwaway redis-server. The service
(pipelines.serve, through Starlette's test client, and once as the real
process) must then give each record the batch job's features and score.
"""

import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import httpx
import pyarrow.parquet as pq
import pytest
import redis
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import batch
from pipelines import generate
from pipelines import serve
from pipelines import train
from pipelines import registry as registry_lib
from schemas.dataset import load_dataset
from pipelines.serving import materialise
from pipelines.serving.batcher import Batcher
from pipelines.serving.model_process import ModelProcessDied
from pipelines.serving.store import RequestStore
from transforms import online_store
from transforms.history_features import history_features
from transforms.inference import TransformedSklearnModelHandler, predict_table
from transforms.common import micros_to_rfc3339
from transforms.parse import RecordValidator, rfc3339_to_micros
from transforms.stream_sources import decode_message
from tests.redis_server import RedisServer, free_port

with warnings.catch_warnings():   # Starlette's note that httpx2 exists
  warnings.simplefilter('ignore')
  from starlette.testclient import TestClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = load_dataset()
KEYS = online_store.Keys(DATASET, DATASET.history)
FEATURES = list(DATASET.history.feature_types())


def _rows(pattern):
  return [r for f in sorted(glob.glob(pattern))
          for r in pq.read_table(f).to_pylist()]


def _order(record):
  return (rfc3339_to_micros(record['event_time']), record['transaction_id'])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('serve')
  server = RedisServer(tmp / 'redis').start()
  path = tmp / 'tx.jsonl'
  assert generate.run(['--output', str(path), '--rows', '2000', '--users',
                       '150', '--seed', '3']) == 0
  out = tmp / 'out'
  summary = batch.run(['--input', str(path), '--output_dir', str(out),
                       '--online_store', server.url(0),
                       # gbt: trees score a row alone, bit-equal in any
                       # batch (logreg's dot products round by batch size).
                       '--model_type', 'gbt'])
  records = sorted((json.loads(line) for line in open(path)), key=_order)
  features = {r['transaction_id']: r for r in _rows(
      str(out / 'features' / '*.parquet'))}
  predictions = {r['transaction_id']: r for r in _rows(
      str(out / 'predictions' / '*.parquet'))}
  try:
    yield dict(tmp=tmp, server=server, summary=summary, records=records,
               features=features, predictions=predictions,
               model_dir=str(out / 'model'), path=str(path))
  finally:
    server.stop()


def _app(run, db=0, url=None, **flags):
  """The application `python -m pipelines.serve` serves with these flags
  (the model of the batch run unless `registry` is given). The store
  timeout is 2 s unless given: these tests are about answers, and a
  machine busy with other jobs can hold a Redis reply past the default
  100 ms (the fault tests set it)."""
  flags.setdefault('store_timeout_ms', 2000)
  # The application's logic, scored on a thread: the model process (the
  # command's default) is tested on its own below and by the commands.
  flags.setdefault('scoring', 'thread')
  argv = ['--online_store', url or run['server'].url(db)]
  if 'registry' not in flags:
    argv += ['--model_dir', run['model_dir']]
  for k, v in flags.items():
    argv += [f'--{k}', str(v)]
  return serve.build_app(serve.parse_flags(argv))


def _client(run, db=0, **flags):
  return TestClient(_app(run, db, **flags))


def _copy_users(run, users, db):
  """A store (database `db`, emptied) holding these users' states as the
  batch run materialised them, and the store's description."""
  source = redis.Redis.from_url(run['server'].url(0))
  target = redis.Redis.from_url(run['server'].url(db))
  target.flushdb()
  for key in [KEYS.meta] + [k for u in users for k in KEYS.of(u)]:
    assert source.copy(key, key, destination_db=db), key
  return target


def _send_at_once(app, bodies, path='/score'):
  """Posts the bodies concurrently on one event loop (as uvicorn serves
  them): the responses in order, and the metrics text afterwards."""
  async def send_all():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport,
                                 base_url='http://serve') as client:
      responses = await asyncio.gather(*(
          client.post(path, content=body) for body in bodies))
      metrics = (await client.get('/metrics')).text
    return responses, metrics
  return asyncio.run(send_all())


def _metric(text, name):
  """The value of an unlabelled sample in Prometheus text."""
  for line in text.splitlines():
    if line.startswith(name + ' '):
      return float(line.split()[1])
  raise AssertionError(f'{name} not in the metrics')


def _state(client: redis.Redis, user):
  times, records, latest = KEYS.of(user)
  return (sorted(client.zrange(times, 0, -1, withscores=True)),
          client.hgetall(records), client.hgetall(latest))


def _assert_as_in_batch(run, record, body):
  """The response's features equal the batch feature row of the record,
  value for value, and its score and band the batch prediction."""
  rid = record['transaction_id']
  row, prediction = run['features'][rid], run['predictions'][rid]
  assert body['features'] == {name: row[name] for name in FEATURES}, rid
  for key in ('score', 'predicted_label', 'risk_category', 'confidence',
              'model_version'):
    assert body[key] == prediction[key], (rid, key)


def test_the_batch_run_materialises_every_user(run):
  """Each user's state is its records within 7 days of its newest (worked
  out here from the input in plain Python) and its newest feature row."""
  store = run['summary']['online_store']
  users = {r['user_id'] for r in run['records']}
  assert store['entities_written'] == len(users)
  assert store['records_written'] > 0
  assert (store['writes_failed'], store['retries']) == (0, 0)
  assert store['model_version'] == run['summary']['model']['version']
  client = redis.Redis.from_url(run['server'].url(0))
  horizon = DATASET.history.horizon * 1_000_000
  for user in users:
    mine = [r for r in run['records'] if r['user_id'] == user]
    newest = max(mine, key=_order)
    cutoff = _order(newest)[0] - horizon
    kept = {r['transaction_id'] for r in mine if _order(r)[0] >= cutoff}
    times, records, latest = _state(client, user)
    assert {m.decode() for m, _ in times} == kept
    assert {k.decode() for k in records} == kept
    assert latest[b'id'].decode() == newest['transaction_id']
    assert online_store.decode(latest[b'features']) == {
        n: run['features'][newest['transaction_id']][n] for n in FEATURES}
    assert latest[b'model_version'].decode() == store['model_version']
  assert store['records_written'] == sum(
      client.zcard(KEYS.of(u)[0]) for u in users)


def test_each_users_newest_record_scores_as_in_batch(run):
  """The store holds all of a newest record's history: the service's
  features and score equal the batch job's for every user."""
  client = _client(run)
  newest = {}
  for record in run['records']:
    newest[record['user_id']] = record        # records are in time order
  assert len(newest) > 100
  for record in newest.values():
    response = client.post('/score', content=json.dumps(record))
    assert response.status_code == 200, response.text
    _assert_as_in_batch(run, record, response.json())


def test_replayed_records_score_as_in_batch_and_converge(run, tmp_path):
  """State as of just before a cut time (the batch materialisation of the
  earlier feature rows), then every later record scored in event-time
  order with ?update=true: each equals its batch row and prediction, and
  the store ends as the batch job left its own."""
  cut = _order(run['records'][1500])[0]
  earlier = [r for r in run['records'] if _order(r)[0] < cut]
  later = [r for r in run['records'] if _order(r)[0] >= cut]
  assert len(later) >= 400
  import pyarrow as pa   # the earlier rows, as the batch job's Parquet
  table = pq.read_table(sorted(glob.glob(os.path.join(
      os.path.dirname(run['model_dir']), 'features', '*.parquet'))))
  ids = pa.array([r['transaction_id'] for r in earlier])
  pq.write_table(table.filter(pa.compute.is_in(
      table.column('transaction_id'), value_set=ids)),
      str(tmp_path / 'earlier.parquet'))
  written = materialise.materialise(
      PipelineOptions([]), DATASET, str(tmp_path / '*.parquet'),
      run['server'].url(1), run['summary']['model']['version'], 4)
  assert written['writes_failed'] == 0
  client = _client(run, db=1, reference_time=run['records'][-1]['event_time'])
  for record in later:
    response = client.post('/score?update=true', content=json.dumps(record))
    assert response.status_code == 200, response.text
    assert response.json()['updated'] is True
    _assert_as_in_batch(run, record, response.json())
  batch_store = redis.Redis.from_url(run['server'].url(0))
  served_store = redis.Redis.from_url(run['server'].url(1))
  for user in {r['user_id'] for r in run['records']}:
    assert _state(served_store, user) == _state(batch_store, user), user


def test_an_unknown_user_has_an_empty_history(run):
  """A user the store has never seen scores like a user's first record in
  batch: the same fields under a new user id get that row's features."""
  first = {}
  for record in run['records']:
    first.setdefault(record['user_id'], record)
  record = next(iter(first.values()))
  stranger = dict(record, user_id='u99999', transaction_id='tx999999999')
  response = _client(run).post('/score', content=json.dumps(stranger))
  assert response.status_code == 200, response.text
  body = response.json()
  assert body['history_records'] == {'user_id': 0}
  assert body['features']['user_id_count_7d'] == 0
  assert body['features'] == {
      n: run['features'][record['transaction_id']][n] for n in FEATURES}


@pytest.mark.parametrize('body, kind, field', [
    (b'{"transaction_id": ', 'malformed', None),
    (b'[1, 2]', 'malformed', None),
    ({'amount': None}, 'missing_required', 'amount'),
    ({'amount': 'ten'}, 'type_error', 'amount'),
    ({'user_id': 'bob'}, 'pattern_mismatch', 'user_id'),
    ({'amount': -5.0}, 'rule_violation', 'amount'),
    ({'currency': 'JPY'}, 'not_allowed', 'currency'),
])
def test_a_bad_record_gets_400_with_its_dead_letter_kind(run, body, kind,
                                                         field):
  if isinstance(body, dict):
    body = json.dumps(dict(run['records'][0], **body)).encode()
  response = _client(run).post('/score', content=body)
  assert response.status_code == 400
  expected = None
  try:   # the very rule the batch and streaming paths apply
    RecordValidator(DATASET).validate(decode_message(body, 'request'))
  except Exception as e:  # pylint: disable=broad-except
    expected = e
  assert response.json() == {'error_kind': kind, 'field': field,
                             'message': expected.message}


def test_health_and_metrics(run):
  client = _client(run)
  health = client.get('/healthz')
  assert health.status_code == 200
  assert health.json()['model_version'] == run['summary']['model']['version']
  client.post('/score', content=json.dumps(run['records'][0]))
  client.post('/score', content=b'not json')
  text = client.get('/metrics').text
  assert 'mlpipe_serve_requests_total{code="200",route="/score"} 1.0' in text
  assert 'mlpipe_serve_requests_total{code="400",route="/score"} 1.0' in text
  assert 'mlpipe_serve_bad_records_total{kind="malformed"} 1.0' in text
  assert 'mlpipe_serve_score_seconds_count 2.0' in text


def test_an_update_never_rewrites_a_stored_record(run):
  """#23.4: the same record again (same id, same values) is idempotent;
  the same id with other values is refused with 409, counted, and the
  user's stored state is left as it was."""
  record = run['records'][-1]
  user = record['user_id']
  store = _copy_users(run, [user], 5)
  before = _state(store, user)
  assert record['transaction_id'].encode() in before[1]
  client = _client(run, db=5, reference_time=record['event_time'])
  again = client.post('/score?update=true', content=json.dumps(record))
  assert again.status_code == 200, again.text
  assert again.json()['updated'] is True
  assert _state(store, user) == before
  rewritten = dict(record, amount=24999.0)
  refused = client.post('/score?update=true', content=json.dumps(rewritten))
  assert refused.status_code == 409, refused.text
  assert record['transaction_id'] in refused.json()['error']
  assert _state(store, user) == before
  assert _metric(client.get('/metrics').text,
                 'mlpipe_serve_update_conflicts_total') == 1


def test_an_update_outside_the_declared_freshness_is_refused(run):
  """#23.5: an update whose event time is outside the declaration's
  freshness (max_future 5m, max_age 90d) around the service's clock is a
  400 `stale` and leaves the store as it was; by default the clock is the
  wall clock (a record of 2261 is refused), with --reference_time a fixed
  instant (5 min after it is refused, 4 min after it is merged)."""
  record = run['records'][-1]
  user, t = record['user_id'], _order(record)[0]
  store = _copy_users(run, [user], 6)
  before = _state(store, user)
  assert len(before[0]) > 1

  def at(micros, rid):
    return json.dumps(dict(record, transaction_id=rid, event_time=(
        micros_to_rfc3339(micros))))

  far = json.dumps(dict(record, transaction_id='tx999999990',
                        event_time='2261-01-01T00:00:00Z'))
  client = _client(run, db=6, reference_time=record['event_time'])
  for asked, body in [
      (_client(run, db=6), far),
      (client, at(t + 301 * 1_000_000, 'tx999999991')),
      (client, at(t - 91 * 86400 * 1_000_000, 'tx999999992'))]:
    response = asked.post('/score?update=true', content=body)
    assert response.status_code == 400, response.text
    assert response.json()['error_kind'] == 'stale'
    assert response.json()['field'] == 'event_time'
    assert _state(store, user) == before
  soon = client.post('/score?update=true',
                     content=at(t + 240 * 1_000_000, 'tx999999993'))
  assert soon.status_code == 200, soon.text
  assert b'tx999999993' in _state(store, user)[1]


BAD_STORED_VALUES = [b'not json', b'\xff\xfe', b'[1, 2]', b'{}',
                     b'{"amount": "ten"}']


def _victim_with_history(run, users: int, victim: int, db: int):
  """The newest record of each of `users` users (copied into store `db`),
  the `victim`-th of them, the store, the victim's hash of stored records
  and the ids of its stored records older than the one it sends."""
  newest = {}
  for record in run['records']:
    newest[record['user_id']] = record
  records = list(newest.values())[:users]
  chosen = records[victim]
  store = _copy_users(run, [r['user_id'] for r in records], db)
  times, hashed, _ = KEYS.of(chosen['user_id'])
  older = [m for m in store.zrange(times, 0, -1)
           if m.decode() != chosen['transaction_id']]
  assert older
  return records, chosen, store, hashed, older


def test_a_bad_stored_state_fails_its_own_request_only(run):
  """#23.8: one user's stored record that is not the documented JSON (not
  JSON, not an object, fields missing or of the wrong type) answers 500
  naming the user for that user's request, and is counted; the other
  requests scored at once with it get their batch answers."""
  records, victim, store, hashed, older = _victim_with_history(run, 40, 7, 7)
  app = _app(run, db=7)
  bodies = [json.dumps(r) for r in records]
  for n, value in enumerate(BAD_STORED_VALUES, 1):
    store.hset(hashed, older[0], value)
    responses, metrics = _send_at_once(app, bodies)
    for record, response in zip(records, responses):
      if record is victim:
        assert response.status_code == 500, (value, response.text)
        error = response.json()['error']
        assert victim['user_id'] in error and 'documented JSON' in error
      else:
        assert response.status_code == 200, (value, response.text)
        _assert_as_in_batch(run, record, response.json())
    assert _metric(metrics, 'mlpipe_serve_bad_stored_states_total') == n
    assert _metric(metrics, 'mlpipe_serve_batch_rows_count') < n * len(
        records)


def test_stored_types_are_checked_once_per_batch_by_the_model_thread(
    run, monkeypatch):
  """#25.5: the event loop, which every request shares, only decodes a
  user's stored JSON; the declared types are checked where a batch's
  stored records are converted for its history features, once for the
  batch (one conversion per history, however many requests), and a state
  that fails it is the BadStoredValue naming its user."""
  records, victim, store, hashed, older = _victim_with_history(run, 6, 0, 8)
  store.hset(hashed, older[0], b'{"amount": "ten"}')
  app = _app(run, db=8)
  scorer, requests = app.state.scorer, RequestStore(
      run['server'].url(8), DATASET, timeout=2)

  async def prepared():
    out = []
    for r in records:
      record = scorer.validate(json.dumps(r).encode())
      out.append(scorer.prepare(record, await requests.records(record)))
    return out
  items = asyncio.run(prepared())      # no error: nothing typed yet
  assert {'amount': 'ten'} in items[0].history['user_id']

  calls = []
  checked = online_store.records_table
  monkeypatch.setattr(online_store, 'records_table',
                      lambda rows, dataset: calls.append(len(rows)) or
                      checked(rows, dataset))
  found = scorer.features(items[1:])
  assert calls == [sum(len(i.history['user_id']) + 1 for i in items[1:])]
  for record, (features, _) in zip(records[1:], found):
    row = run['features'][record['transaction_id']]
    assert features == {n: row[n] for n in FEATURES}
  with pytest.raises(online_store.BadStoredValue,
                     match=f'{victim["user_id"]} is not the documented'):
    scorer.features(items[:1])


def test_a_paused_store_answers_every_request_within_its_timeout(run,
                                                                 tmp_path):
  """#25.5: Redis paused (SIGSTOP) while 40 requests arrive at 50 per
  second, open loop: every request is answered with a 503 (the timeout
  named, or busy) within the store timeout plus a margin for a busy
  machine, none waiting for the ones before it (late answers counted:
  none); then, still paused, of a burst of 40 at once at most
  --max_waiting wait for the store and the others are refused at once as
  busy (Retry-After: 1); once Redis runs again the service scores."""
  paused = RedisServer(tmp_path / 'redis').start()
  timeout, sent, every, bound = 0.2, 40, 0.02, 16
  app = _app(run, url=paused.url(), store_timeout_ms=int(timeout * 1000),
             max_waiting=bound)
  body = json.dumps(run['records'][-1])

  async def trial():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport,
                                 base_url='http://serve') as client:
      deadline = time.monotonic() + 60     # a bounded warm-up
      while (await client.post('/score', content=body)).status_code != 200:
        assert time.monotonic() < deadline, 'the store never answered'
      os.kill(paused.process.pid, signal.SIGSTOP)
      try:
        start = time.perf_counter()

        async def one(i):
          await asyncio.sleep(i * every)
          response = await client.post('/score', content=body)
          # Open loop: from when the request was due, not when it left.
          return response, time.perf_counter() - start - i * every

        steady = await asyncio.gather(*(one(i) for i in range(sent)))
        burst = await asyncio.gather(*(
            client.post('/score', content=body) for _ in range(40)))
      finally:
        os.kill(paused.process.pid, signal.SIGCONT)
      deadline = time.monotonic() + 60
      while (await client.post('/score', content=body)).status_code != 200:
        assert time.monotonic() < deadline, 'the service did not recover'
        await asyncio.sleep(0.1)
    return steady, burst

  try:
    steady, burst = asyncio.run(trial())
  finally:
    paused.stop()

  def kind(response):
    error = response.json().get('error', '')
    return (response.status_code, 'busy' if error.startswith('busy') else
            'timeout' if 'TimeoutError' in error else error)

  kinds = [kind(r) for r, _ in steady]
  assert set(kinds) <= {(503, 'timeout'), (503, 'busy')}, kinds
  assert kinds.count((503, 'timeout')) >= sent // 2, kinds
  late = [round(s, 3) for _, s in steady if s > timeout + 0.8]
  assert not late, f'{len(late)} of {sent} answered late: {late}'
  kinds = [kind(r) for r in burst]
  assert set(kinds) == {(503, 'timeout'), (503, 'busy')}, kinds
  # The first `bound` to arrive wait for the store; one more is refused
  # while they wait (a slot frees only when one of them times out).
  assert kinds.count((503, 'timeout')) >= bound, kinds
  assert all(r.headers['retry-after'] == '1' for r in burst
             if kind(r)[1] == 'busy')


def test_a_slow_store_is_a_503_and_then_recovers(run):
  """A store that does not answer within --store_timeout_ms (all clients
  paused) gets a 503 naming the timeout, never a hang; once it answers
  again the same service scores."""
  client = _client(run, store_timeout_ms=100)
  record = json.dumps(run['records'][-1])
  # Every client is paused for 3 s (no client can end a pause early):
  # the two requests below are sent at once, well inside it.
  redis.Redis.from_url(run['server'].url(0)).execute_command(
      'CLIENT', 'PAUSE', 3000, 'ALL')
  response = client.post('/score', content=record)
  health = client.get('/healthz')
  assert response.status_code == 503
  assert 'unavailable' in response.json()['error']
  assert 'Timeout' in response.json()['error']
  assert health.status_code == 503
  deadline = time.monotonic() + 60     # bounded wait for the pause to end
  while client.post('/score', content=record).status_code != 200:
    assert time.monotonic() < deadline, 'the service did not recover'
    time.sleep(0.2)


def _wait_for(url, deadline):
  while time.monotonic() < deadline:
    try:
      return httpx.get(url, timeout=2)
    except httpx.TransportError:
      time.sleep(0.1)
  raise AssertionError(f'{url} did not answer')


def test_the_service_process_survives_redis_going_away(run, tmp_path):
  """The real command: 200, then Redis stopped -> 503 with a clear
  message (connection refused), then Redis back on its port -> 200."""
  fault = RedisServer(tmp_path / 'redis').start()
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.serve', '--model_dir',
       run['model_dir'], '--online_store', fault.url(), '--port', str(port),
       '--reference_time', run['records'][-1]['event_time'],
       # The store's faults are the point: scored on a thread, the test
       # skips a second model load (the workers test runs the default).
       '--scoring', 'thread'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  base = f'http://127.0.0.1:{port}'
  record = json.dumps(run['records'][-1])
  try:
    # Loading TensorFlow and the model takes 80 s on a machine at load 22.
    assert _wait_for(f'{base}/healthz',
                     time.monotonic() + 300).status_code == 200
    assert httpx.post(f'{base}/score', content=record,
                      timeout=60).status_code == 200
    fault.stop()
    down = httpx.post(f'{base}/score', content=record, timeout=10)
    assert down.status_code == 503
    assert down.json()['error'].startswith(
        f'online store {fault.url()} unavailable: ConnectionError')
    assert httpx.get(f'{base}/healthz', timeout=10).status_code == 503
    fault.start()
    up = httpx.post(f'{base}/score?update=true', content=record, timeout=10)
    assert up.status_code == 200, up.text
    assert up.json()['updated'] is True
  finally:
    process.terminate()
    process.wait(timeout=30)
    fault.stop()


def test_start_up_errors_are_one_line_and_exit_2(run, capsys):
  nobody = f'redis://127.0.0.1:{free_port()}/0'
  cases = [
      (['--online_store', run['server'].url(0)],
       'one of the arguments --registry --model_dir is required'),
      (['--model_dir', run['model_dir']],
       'the following arguments are required: --online_store'),
      (['--model_dir', run['model_dir'], '--online_store',
        'http://127.0.0.1:1'], 'give a redis:// URL'),
      (['--model_dir', run['model_dir'], '--online_store', nobody],
       f'--online_store {nobody} does not answer: ConnectionError'),
      (['--registry', str(run['tmp'] / 'no-registry'), '--online_store',
        run['server'].url(0)], 'has no champion model yet'),
      (['--model_dir', run['model_dir'], '--online_store',
        run['server'].url(0), '--model_poll_seconds', '5'],
       '--model_poll_seconds follows a registry\'s champion'),
      (['--model_dir', run['model_dir'], '--online_store',
        run['server'].url(0), '--max_batch_rows', '0'],
       '--max_batch_rows positive'),
      (['--model_dir', run['model_dir'], '--online_store',
        run['server'].url(0), '--workers', '0'],
       '--workers must be positive'),
  ]
  for argv, message in cases:
    assert serve.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, (argv, err)
  # The batch job checks the store before anything starts, too.
  assert batch.main(['--output_dir', str(run['tmp'] / 'never'),
                     '--online_store', nobody]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith(f'error: --online_store {nobody} does not answer: '
                        'ConnectionError')
  assert not (run['tmp'] / 'never').exists()


def test_concurrent_requests_are_scored_together_as_in_batch(run):
  """Requests at once (one event loop, as under uvicorn): the model is
  called fewer times than there are requests, so rows shared a call, and
  every answer is still its own record's batch row and prediction. Among
  them, several records of one user: each whose 7-day window the store
  holds whole (no record of the user in it older than 7 days before the
  user's newest), so each has its batch features; requests for one user
  in one batch must not see each other."""
  app = _app(run)
  newest, mine = {}, {}
  for record in run['records']:
    newest[record['user_id']] = record
    mine.setdefault(record['user_id'], []).append(record)
  horizon = DATASET.history.horizon * 1_000_000

  def held(record):
    rs = mine[record['user_id']]
    cutoff, t = _order(rs[-1])[0] - horizon, _order(record)[0]
    return all(_order(x)[0] >= cutoff for x in rs
               if t - horizon <= _order(x)[0] < t)

  many = {u: [r for r in rs if held(r)] for u, rs in mine.items()}
  many = {u: rs for u, rs in sorted(many.items()) if len(rs) >= 3}
  assert len(many) >= 5
  users = list(many)[:5]
  records = [newest[u] for u in newest if u not in users][:100]
  records += [r for u in users for r in many[u]]
  assert len(records) >= 115

  responses, metrics = _send_at_once(app, [json.dumps(r) for r in records])
  for record, response in zip(records, responses):
    assert response.status_code == 200, response.text
    assert response.json()['id'] == record['transaction_id']
    _assert_as_in_batch(run, record, response.json())
  assert _metric(metrics, 'mlpipe_serve_batch_rows_sum') == len(records)
  assert _metric(metrics, 'mlpipe_serve_batch_rows_count') < len(records)


def test_the_batcher_keeps_each_answer_with_its_request():
  """Rows from concurrent callers come back to their own caller, batches
  hold at most max_rows, and a failed call is made again row by row, so
  only the row that cannot be scored fails (#23.8)."""
  calls = []

  def predict(rows):
    calls.append(list(rows))
    if 'bad' in rows:
      raise ValueError('no score for bad')
    return [f'score of {r}' for r in rows]

  batcher = Batcher(predict, max_rows=4)

  async def send(rows):
    return await asyncio.gather(*(batcher.score(r) for r in rows),
                                return_exceptions=True)

  rows = [f'r{i}' for i in range(10)]
  assert asyncio.run(send(rows)) == [f'score of {r}' for r in rows]
  assert [len(c) for c in calls] == [4, 4, 2]      # 10 waiting, 4 a call
  assert [r for c in calls for r in c] == rows
  calls.clear()
  answers = asyncio.run(send(['a', 'b', 'c', 'bad', 'd']))
  assert answers[:3] + answers[4:] == ['score of a', 'score of b',
                                       'score of c', 'score of d']
  assert isinstance(answers[3], ValueError)
  assert str(answers[3]) == 'no score for bad'
  # The failed batch, then its rows alone, then the next batch.
  assert calls == [['a', 'b', 'c', 'bad'], ['a'], ['b'], ['c'], ['bad'],
                   ['d']]


def test_the_batcher_gives_each_batch_to_a_free_model_process():
  """With several model processes (--model_processes), a batch goes to
  one that is free while another still scores; rows waiting meanwhile
  form the next batch; a process that died fails its own batch only."""
  log = []

  class Fake:
    """A ModelProcess's awaitable predict: slow, so batches overlap."""

    def __init__(self, name, dies=False):
      self.name, self.dies = name, dies

    async def predict(self, rows):
      log.append((self.name, 'start', list(rows)))
      await asyncio.sleep(0.05)
      log.append((self.name, 'end'))
      if self.dies:
        raise ModelProcessDied('the model process died while scoring')
      return [f'{self.name}: {r}' for r in rows]

  async def send(batcher, rows):
    first = asyncio.ensure_future(batcher.score(rows[0]))
    await asyncio.sleep(0.01)       # the first batch is out: one row
    rest = [asyncio.ensure_future(batcher.score(r)) for r in rows[1:]]
    return await asyncio.gather(first, *rest, return_exceptions=True)

  batcher = Batcher(max_rows=2, processes=[Fake('p1'), Fake('p2')])
  answers = asyncio.run(send(batcher, ['a', 'b', 'c', 'd', 'e']))
  # a alone on one process; b, c on the other at once (no wait for a);
  # d, e when the first is free again.
  assert answers == ['p2: a', 'p1: b', 'p1: c', 'p2: d', 'p2: e']
  assert log[:3] == [('p2', 'start', ['a']), ('p1', 'start', ['b', 'c']),
                     ('p2', 'end')]
  log.clear()
  batcher = Batcher(max_rows=2, processes=[Fake('p1', dies=True),
                                           Fake('p2')])
  answers = asyncio.run(send(batcher, ['a', 'b', 'c']))
  assert answers[0] == 'p2: a'
  assert all(isinstance(a, ModelProcessDied) for a in answers[1:])


@pytest.fixture(scope='module')
def second_model(run):
  """A second model of the same transform graph (logistic regression on
  the batch run's transformed rows): another version to promote."""
  out = os.path.dirname(run['model_dir'])
  model_dir = str(run['tmp'] / 'model2')
  assert train.main(['--transformed', os.path.join(out, 'transform',
                                                   'transformed'),
                     '--transform_dir', os.path.join(out, 'transform',
                                                     'transform_fn'),
                     '--model_dir', model_dir, '--model', 'logreg']) == 0
  return model_dir


def _wait_until(condition, what, seconds=60):
  """Bounded wait for the service's poller (not a timing assertion)."""
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, what
    time.sleep(0.1)


@pytest.mark.parametrize('scoring', ['thread', 'process'])
def test_the_service_follows_a_promotion_without_restart(run, second_model,
                                                         tmp_path, scoring):
  """Serving a registry's champion, polled every 0.2 s: a promoted model
  whose file was altered is refused (the champion keeps serving, the
  failure is counted); once the file is right again the new champion
  serves, same process, and its scores are that model's own. With the
  model in its own process, that process follows the registry."""
  root = str(tmp_path / 'registry')
  registry = registry_lib.Registry(root)
  first = registry.register(run['model_dir'], 'first')['version']
  second = registry.register(second_model, 'second')['version']
  assert first != second
  app = _app(run, registry=root, model_poll_seconds=0.2, scoring=scoring)
  record = run['records'][-1]
  body = json.dumps(record)
  with TestClient(app) as client:     # `with`: the lifespan starts polling
    assert client.post('/score', content=body).json()[
        'model_version'] == first
    model_file = os.path.join(root, 'models', second, 'model.skops')
    good = model_file + '.good'
    shutil.copy(model_file, good)
    with open(model_file, 'ab') as f:
      f.write(b'\0')
    assert registry_lib.main(['promote', second, '--registry', root]) == 0
    _wait_until(lambda: _metric(client.get('/metrics').text,
                                'mlpipe_serve_model_swap_failures') >= 1,
                'the poller never tried the promoted model')
    response = client.post('/score', content=body)
    assert response.json()['model_version'] == first
    _assert_as_in_batch(run, record, response.json())
    os.replace(good, model_file)
    _wait_until(lambda: client.get('/healthz').json()[
        'model_version'] == second, 'the new champion was never served')
    answer = client.post('/score', content=body).json()
    metrics = client.get('/metrics').text
  assert answer['model_version'] == second
  # The new model's own score of the same row (the batch features).
  model = TransformedSklearnModelHandler(second_model).load_model()
  import pyarrow as pa
  row = run['features'][record['transaction_id']]
  expected = predict_table(model, pa.Table.from_pylist([row]),
                           'transaction_id').to_pylist()[0]
  assert answer['features'] == {n: row[n] for n in FEATURES}
  for key in ('score', 'predicted_label', 'risk_category', 'confidence'):
    assert answer[key] == expected[key], key
  assert answer['score'] != run['predictions'][record['transaction_id']][
      'score']
  assert f'mlpipe_serve_model_info{{model_version="{second}"}} 1.0' in metrics
  assert first not in metrics
  assert _metric(metrics, 'mlpipe_serve_model_swaps') == 1


def _newest_per_user(run):
  """The newest record of each user: scored alone, its stored history is
  the batch job's (an older record's store already holds later ones)."""
  newest = {}
  for record in run['records']:
    newest[record['user_id']] = record
  return list(newest.values())


def test_the_model_process_scores_as_in_batch_and_is_replaced_when_killed(
    run):
  """--scoring process (the command's default): answers equal the batch
  job's; the process killed mid-service fails the next batch with a 503
  and is started again (the requests after it wait for it and score as
  before); it ends with the application."""
  app = _app(run, scoring='process')
  records = _newest_per_user(run)[:6]
  with TestClient(app) as client:
    process, = app.state.processes
    first = process.pid
    assert first is not None and first != os.getpid()
    for record in records[:3]:
      response = client.post('/score', content=json.dumps(record))
      assert response.status_code == 200, response.text
      _assert_as_in_batch(run, record, response.json())
    assert client.get('/healthz').json()['model_version'] == \
        run['summary']['model']['version']
    os.kill(first, signal.SIGKILL)
    _wait_until(lambda: not process._process.is_alive(),  # pylint: disable=protected-access
                'the model process did not die')
    died = client.post('/score', content=json.dumps(records[3]))
    assert died.status_code == 503
    assert 'model process died' in died.json()['error']
    assert died.headers['Retry-After'] == '1'
    for record in records[3:]:
      response = client.post('/score', content=json.dumps(record))
      assert response.status_code == 200, response.text
      _assert_as_in_batch(run, record, response.json())
    assert process.pid not in (None, first)
    metrics = client.get('/metrics').text
    assert _metric(metrics, 'mlpipe_serve_model_process_restarts') == 1
    assert ('mlpipe_serve_requests_total{code="503",route="/score"} 1.0'
            in metrics)
    last = process._process  # pylint: disable=protected-access
  assert not last.is_alive()      # stopped with the application


def test_workers_share_the_port_and_score_as_in_batch(run):
  """--workers 2: two serving processes answer on the one port (seen by
  the pid /healthz reports, over fresh connections from 8 threads), and
  a score from either is the batch job's."""
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.serve', '--model_dir',
       run['model_dir'], '--online_store', run['server'].url(0), '--port',
       str(port), '--workers', '2',
       # A busy machine holds a Redis reply past the 100 ms default.
       '--store_timeout_ms', '2000'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  base = f'http://127.0.0.1:{port}'
  newest = {}
  for record in run['records']:
    newest[record['user_id']] = record
  records = list(newest.values())[:40]
  try:
    # Three processes load TensorFlow and the model (the supervisor checks
    # first): minutes on a machine busy with other jobs.
    assert _wait_for(f'{base}/healthz',
                     time.monotonic() + 600).status_code == 200
    workers = set()
    deadline = time.monotonic() + 120     # both workers up, bounded

    def ask(record):
      response = httpx.post(f'{base}/score', content=json.dumps(record),
                            timeout=60)
      assert response.status_code == 200, response.text
      _assert_as_in_batch(run, record, response.json())
      return httpx.get(f'{base}/healthz', timeout=60).json()['worker']

    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      while len(workers) < 2:
        assert time.monotonic() < deadline, f'only workers {workers} answered'
        workers.update(pool.map(ask, records))
    assert process.pid not in workers     # the supervisor serves nothing
  finally:
    process.terminate()
    process.wait(timeout=60)


def test_the_service_runs_on_uvloop_and_httptools():
  """The flags uvicorn gets resolve to libuv's loop and the C parser (both
  pinned): uvicorn would fall back to h11 and asyncio's loop silently
  under 'auto'; named, a missing package is an error at start."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # pylint: disable=g-import-not-at-top
  config = uvicorn.Config(lambda scope, receive, send: None, **serve.SERVER)
  config.load()
  assert config.http_protocol_class is HttpToolsProtocol
  assert config.get_loop_factory().__module__.startswith('uvloop')


def test_the_store_client_parses_replies_with_hiredis():
  """redis-py parses Redis's replies with hiredis' C parser (pinned), the
  cheaper one on the event loop; it falls back to its Python parser
  silently when hiredis is missing or too old."""
  import redis.asyncio.connection  # pylint: disable=g-import-not-at-top
  import redis.utils  # pylint: disable=g-import-not-at-top
  assert redis.utils.HIREDIS_AVAILABLE
  assert 'Hiredis' in redis.asyncio.connection.DefaultParser.__name__
