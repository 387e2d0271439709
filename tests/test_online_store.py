"""The online store's layout, its writers and their convergence, and write
failures (retried, counted), against a throwaway redis-server."""

import random

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from pipelines.synthetic.transactions import generate_transactions
from schemas.dataset import load_dataset
from pipelines.serving import materialise
from transforms import online_store
from transforms.common import shard_of
from transforms.history_features import history_table
from transforms.parse import rfc3339_to_micros
from tests.redis_server import RedisServer

DATASET = load_dataset()
SPEC = DATASET.history
KEYS = online_store.Keys(DATASET, SPEC)
DAY = 86400 * 1_000_000


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  with RedisServer(tmp_path_factory.mktemp('redis')) as running:
    yield running


@pytest.fixture(scope='module')
def rows():
  """Feature rows of 600 generated records of 20 users (the batch
  function), as one table."""
  records = generate_transactions(rows=600, users=20, seed=5)
  for r in records:
    r['event_time'] = rfc3339_to_micros(r['event_time'])
  table = pa.Table.from_pylist(records, schema=DATASET.batch_schema())
  return history_table(table, DATASET)


def _snapshot(url, users):
  client = redis.Redis.from_url(url)
  out = {}
  for user in sorted(users):
    times, records, latest = KEYS.of(user)
    out[user] = (client.zrange(times, 0, -1, withscores=True),
                 client.hgetall(records), client.hgetall(latest))
  return out


def _write(table, url, shards=3):
  with TestPipeline() as p:
    counts = (p | beam.Create(table.to_batches(max_chunksize=100))
              | online_store.WriteOnlineStore(DATASET, url, 'v1',
                                              num_shards=shards))
    assert_that(counts | beam.Map(lambda c: c['entities_failed']) |
                beam.CombineGlobally(sum), equal_to([0]))


def _record(rid, user, day, amount=10.0, country='US'):
  return {'transaction_id': rid, 'user_id': user, 'merchant_id': 'm00001',
          'merchant_category': 'grocery', 'amount': amount,
          'currency': 'USD', 'channel': 'pos', 'country': country,
          'event_time': int(day * DAY), 'is_fraud': 0}


def test_key_layout_and_encoding():
  assert KEYS.of('u00042') == ('mlpipe:transactions:user_id:t:{u00042}',
                               'mlpipe:transactions:user_id:r:{u00042}',
                               'mlpipe:transactions:user_id:f:{u00042}')
  assert KEYS.meta == 'mlpipe:transactions:meta'
  assert online_store.encode({'b': 0.1 + 0.2, 'a': 1}) == \
      '{"a":1,"b":0.30000000000000004}'
  value = {'amount': 23.13, 'x': 5e-324, 'n': -7, 's': 'é'}
  assert online_store.decode(online_store.encode(value)) == value
  # Plain JSON only: a pickle (which could run code) is refused unread.
  import pickle
  with pytest.raises(ValueError):
    online_store.decode(pickle.dumps(value))
  with pytest.raises(online_store.BadStoredValue):
    online_store.decode('[1, 2]')


def test_read_records_accepts_the_documented_json_only():
  """A stored record is read only if it is a JSON object of the declared
  types with every required field; anything else is BadStoredValue
  (#23.8), not a row that fails a later step."""
  good = _record('tx1', 'u1', 1.0)
  text = online_store.encode(good).encode()
  assert online_store.read_records([text, text], DATASET) == [good, good]
  missing = {k: v for k, v in good.items() if k != 'event_time'}
  for bad in [b'not json', b'\xff\xfe', b'[1, 2]', b'{}',
              online_store.encode(dict(good, amount='ten')).encode(),
              online_store.encode(missing).encode()]:
    with pytest.raises(online_store.BadStoredValue):
      online_store.read_records([text, bad], DATASET)


def test_the_request_script_adds_or_repeats_but_never_rewrites(server):
  """ADD_SCRIPT (the service's ?update=true): a new record is merged, the
  same record again changes nothing, the same id with other values is
  refused (-1) before anything is written (#23.4)."""
  client = redis.Redis.from_url(server.url(3))
  script = client.register_script(online_store.ADD_SCRIPT)
  record = _record('tx1', 'u1', 1.0, amount=146.09)
  t = record['event_time']

  def add(row):
    return script(keys=KEYS.of('u1'), args=online_store.merge_args(
        SPEC, 100, [('tx1', t, online_store.encode(row))],
        (t, 'tx1', online_store.encode({'n': row['amount']})), 'v1'))

  assert add(record) == 1
  stored = _snapshot(server.url(3), ['u1'])
  assert add(record) == 1
  assert _snapshot(server.url(3), ['u1']) == stored
  assert add(dict(record, amount=24999.0)) == -1
  assert _snapshot(server.url(3), ['u1']) == stored
  assert online_store.decode(stored['u1'][1][b'tx1'])['amount'] == 146.09


def test_an_entity_keeps_its_last_seven_days_and_newest_features():
  """By hand: a's records at days 0, 1, 8 and 8 (a tie, larger id): the
  horizon is 7 days before day 8, so day 1 (exactly 7 days old) stays and
  day 0 goes; the latest vector is the tie's larger id. b has one record."""
  table = history_table(pa.Table.from_pylist([
      _record('tx000000001', 'a', 0), _record('tx000000002', 'a', 1),
      _record('tx000000004', 'a', 8), _record('tx000000003', 'a', 8),
      _record('tx000000005', 'b', 3)], schema=DATASET.batch_schema()),
      DATASET)
  states = {e: (rows, latest) for e, rows, latest in
            online_store.entity_states(table, DATASET, SPEC)}
  rows, latest = states['a']
  assert [(rid, t // DAY) for rid, t, _ in rows] == [
      ('tx000000002', 1), ('tx000000003', 8), ('tx000000004', 8)]
  assert online_store.decode(rows[0][2])['amount'] == 10.0
  assert latest[:2] == (8 * DAY, 'tx000000004')
  # tx4's features: 1 record (day 1) in 7 days, the tie tx3 excluded.
  assert online_store.decode(latest[2])['user_id_count_7d'] == 1
  assert [rid for rid, _, _ in states['b'][0]] == ['tx000000005']
  capped = {e: rows for e, rows, _ in online_store.entity_states(
      table, DATASET, SPEC, max_records=1)}
  assert [rid for rid, _, _ in capped['a']] == ['tx000000004']


def test_batch_writes_are_idempotent_and_converge_in_any_order(server,
                                                                rows):
  users = set(rows.column('user_id').to_pylist())
  _write(rows, server.url(0))
  once = _snapshot(server.url(0), users)
  assert len(once) == 20 and all(state[0] for state in once.values())
  _write(rows, server.url(0), shards=5)          # a rerun changes nothing
  assert _snapshot(server.url(0), users) == once
  # The later half first, then the earlier half: the same state.
  half = rows.num_rows // 2
  by_time = rows.sort_by('event_time')
  _write(by_time.slice(half), server.url(1))
  _write(by_time.slice(0, half), server.url(1))
  assert _snapshot(server.url(1), users) == once


def test_streaming_updates_per_batch_converge_with_batch(server, rows):
  """The streaming DoFn, batch by batch in a shuffled order (late and
  early events alike, an entity's events spread over batches), leaves the
  state batch leaves."""
  users = set(rows.column('user_id').to_pylist())
  _write(rows, server.url(0))
  order = list(range(rows.num_rows))
  random.Random(3).shuffle(order)
  shuffled = rows.take(pa.array(order))
  fn = online_store._UpdatePerBatch(DATASET, server.url(2), 'v1',  # pylint: disable=protected-access
                                    online_store.DEFAULT_MAX_RECORDS, 50, 3,
                                    2.0)
  fn.setup()
  for batch in shuffled.to_batches(max_chunksize=70):
    assert list(fn.process(batch)) == [batch]
  assert _snapshot(server.url(2), users) == _snapshot(server.url(0), users)


class _FailsOnce:
  """A redis-py client whose first pipeline fails to execute."""

  def __init__(self, client):
    self._client, self.failures = client, 0

  def pipeline(self, **kwargs):
    pipe = self._client.pipeline(**kwargs)
    if not self.failures:
      self.failures += 1

      def broken(*args, **kw):
        raise redis.ConnectionError('connection reset (injected)')
      pipe.execute = broken
    return pipe


def test_a_failed_pipeline_is_retried_and_counted(server, rows):
  users = set(rows.column('user_id').to_pylist())
  fn = online_store._WriteShards(DATASET, SPEC, server.url(3), 'v1',  # pylint: disable=protected-access
                                 online_store.DEFAULT_MAX_RECORDS, 500, 3,
                                 2.0)
  fn.setup()
  fn._client = _FailsOnce(fn._client)  # pylint: disable=protected-access
  [counts] = list(fn.process((0, rows.to_batches())))
  assert counts['retries'] == 1
  assert (counts['entities'], counts['entities_failed']) == (20, 0)
  _write(rows, server.url(0))
  assert _snapshot(server.url(3), users) == _snapshot(server.url(0), users)


def test_a_store_that_refuses_writes_is_counted_not_fatal(tmp_path, rows):
  """A full store (maxmemory reached, every write refused with OOM): the
  materialisation the batch job runs finishes and its summary says how
  many writes failed, after two retries of each pipeline."""
  path = tmp_path / 'features.parquet'
  pq.write_table(rows, str(path))
  with RedisServer(tmp_path / 'redis') as full:
    redis.Redis.from_url(full.url()).config_set('maxmemory', 1)
    summary = materialise.materialise(PipelineOptions([]), DATASET,
                                       str(path), full.url(), 'v1', 2)
  # Shards are written one pipeline each (< 500 users a shard).
  shards = len(set(shard_of(rows.column('user_id'), 2).tolist()))
  assert summary['writes_failed'] == 20
  assert summary['records_failed'] > 0
  assert summary['entities_written'] == 0
  assert summary['retries'] == 2 * shards
  assert summary['meta_written'] is False
