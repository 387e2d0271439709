"""Streaming history features with more than one history (the interactions'
user then item) on several shards, and the expiry of history state by the
watermark (transforms/history_features.py, StatefulHistoryFeatures)."""

import json
import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas.dataset import load_dataset
from transforms.common import shard_of
from transforms.history_features import (StatefulHistoryFeatures,
                                         history_table)

INTERACTIONS = load_dataset('interactions')
TRANSACTIONS = load_dataset()
MIN = 60 * 1_000_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T0 = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z


def _streaming():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


def _stream():
  return TestStream(coder=beam.coders.PickleCoder())


def _interaction(i, user, item, t, kind='view', value=1.0):
  return {'interaction_id': i, 'user_id': user, 'item_id': item,
          'interaction_type': kind, 'value': value, 'event_time': t}


def _at(dataset, records):
  """A streaming batch of `records`, stamped with its earliest event time
  (as every streaming batch is)."""
  return TimestampedValue(
      pa.RecordBatch.from_pylist(list(records),
                                 schema=dataset.batch_schema()),
      Timestamp(micros=min(r['event_time'] for r in records)))


def _batch_rows(dataset, records):
  """The batch definition's rows (history_table, every history) as JSON."""
  table = history_table(pa.Table.from_pylist(
      records, schema=dataset.batch_schema()), dataset)
  return [json.dumps(r, sort_keys=True) for r in table.to_pylist()]


def _stream_rows(p, stream, dataset, shards):
  return (p | stream
          | StatefulHistoryFeatures(dataset, 3600, num_shards=shards)
          | beam.FlatMap(lambda b: b.to_pylist())
          | beam.Map(json.dumps, sort_keys=True))


def _users_on_two_shards(shards=2):
  users = np.arange(20)
  shard = shard_of(pa.array(users), shards)
  return int(users[shard == 0][0]), int(users[shard == 1][0])


# A second history on a parallel runner --------------------------------------
def test_a_second_history_counts_rows_still_waiting_in_another_users_shard():
  # Users a and b are on different shards of the user history. a's batch
  # holds i1 (item 5, 10 min) and i3 (item 6, 50 min); b's holds i2 (item
  # 5, 20 min). When the watermark passes 30 min, b's shard computes i2,
  # while a's still waits for its batch's newest (50 min). Chained, the
  # item history then computed i2 at once, before i1 reached it: i2's item
  # counts were 0. By hand, as batch: i2's item 5 has i1 10 minutes before
  # it, so item_id_count_1d = 1 and one distinct user in 7 d.
  a, b = _users_on_two_shards()
  i1 = _interaction(1, a, 5, T0 + 10 * MIN)
  i2 = _interaction(2, b, 5, T0 + 20 * MIN)
  i3 = _interaction(3, a, 6, T0 + 50 * MIN, kind='purchase')
  stream = (_stream()
            .add_elements([_at(INTERACTIONS, [i1, i3])])
            .add_elements([_at(INTERACTIONS, [i2])])
            .advance_watermark_to(Timestamp(micros=T0 + 30 * MIN))
            .advance_watermark_to(Timestamp(micros=T0 + 60 * MIN))
            .advance_watermark_to_infinity())
  expected = _batch_rows(INTERACTIONS, [i1, i2, i3])
  row_2 = [json.loads(r) for r in expected if '"interaction_id": 2,' in r][0]
  assert (row_2['item_id_count_1d'], row_2['item_id_distinct_user_id_7d'],
          row_2['user_id_count_1d']) == (1, 1, 0)
  with _streaming() as p:
    assert_that(_stream_rows(p, stream, INTERACTIONS, shards=2),
                equal_to(expected))


def _interactions(n_events=900, n_users=30, n_items=12, seed=3):
  """Events over 3 days on a 5-minute grid (ties are common)."""
  rng = random.Random(seed)
  kinds = ['view', 'view', 'click', 'add_to_cart', 'purchase']
  records = [_interaction(i, rng.randrange(n_users), rng.randrange(n_items),
                          T0 + rng.randrange(3 * 24 * 12) * 5 * MIN,
                          rng.choice(kinds), rng.choice([0.0, 1.5, 20.0]))
             for i in range(n_events)]
  records.sort(key=lambda r: (r['event_time'], r['interaction_id']))
  return records


def test_every_history_equals_batch_with_shuffled_arrival_on_many_shards():
  # Each chunk of 90 events arrives in three batches in random order, as a
  # parallel runner's shuffles deliver them, then the watermark moves to
  # the chunk's median event time: a shard computes the rows it has passed
  # only once it passes their batch's newest, so shards flush at different
  # steps. Every event is on time (the next chunk is later than this one),
  # so every row (user and item features) is batch's.
  records = _interactions()
  stream = _stream()
  for start in range(0, len(records), 90):
    chunk = random.Random(start).sample(records[start:start + 90], 90)
    stream.add_elements([_at(INTERACTIONS, chunk[i:i + 30])
                         for i in (60, 0, 30)])
    stream.advance_watermark_to(Timestamp(micros=sorted(
        r['event_time'] for r in chunk)[45]))
  # Past every event before the end, as a replay ends.
  stream.advance_watermark_to(Timestamp(micros=records[-1]['event_time']))
  stream.advance_watermark_to_infinity()
  with _streaming() as p:
    assert_that(_stream_rows(p, stream, INTERACTIONS, shards=4),
                equal_to(_batch_rows(INTERACTIONS, records)))


# Expiry by the watermark ------------------------------------------------------
def _transaction(i, user, t, amount=10.0):
  return {'transaction_id': f'tx{i:09d}', 'user_id': user,
          'merchant_id': 'm00001', 'merchant_category': 'grocery',
          'amount': amount, 'currency': 'USD', 'channel': 'pos',
          'country': 'US', 'event_time': t, 'is_fraud': 0}


class _Cell:
  """In-memory value state and timer, for running the DoFn directly."""

  def __init__(self):
    self.value, self.at = None, None

  def read(self):
    return self.value

  def write(self, value):
    self.value = value

  def clear(self):
    self.value = None

  def set(self, at):
    self.at = at.micros


class _Bag(_Cell):

  def __init__(self):
    super().__init__()
    self.value = []

  def add(self, value):
    self.value.append(value)

  def clear(self):
    self.value = []


class _Shard:
  """One shard of `_ShardHistoryFn`, its state and timers in memory."""

  def __init__(self, dataset, allowed_lateness):
    from transforms.history_features import _ShardHistoryFn  # pylint: disable=import-outside-toplevel
    self.fn = _ShardHistoryFn(dataset, dataset.history, allowed_lateness)
    self.dataset = dataset
    self.pending, self.flush_at, self.history = _Bag(), _Cell(), _Bag()
    self.flush, self.expire = _Cell(), _Cell()

  def arrive(self, records):
    self.fn.process((0, pa.RecordBatch.from_pylist(
        records, schema=self.dataset.batch_schema())), pending=self.pending,
                    flush_at=self.flush_at, flush=self.flush)

  def fire_flush(self):
    out = list(self.fn.flush_ready(
        fired=Timestamp(micros=self.flush.at), pending=self.pending,
        flush_at=self.flush_at, history=self.history, flush=self.flush,
        expire=self.expire))
    return [r for b in out for r in b.value.to_pylist()]

  def fire_expire(self):
    self.fn.expire_history(
        fired=Timestamp(micros=self.expire.at), pending=self.pending,
        history=self.history, expire=self.expire)

  def retained(self):
    return [i for batch in self.history.read()
            for i in batch.column('transaction_id').to_pylist()]


def test_history_state_drops_to_the_active_entities_after_a_watermark_jump():
  # 300 users seen once on day 0, then three of them active again on day
  # 8: the flush of day 8 keeps only rows within 7 d (horizon) + 1 h
  # (allowed lateness) of its time, i.e. the three new rows; the expire
  # timer, 7 d 1 h after the newest of them, empties the idle shard.
  shard = _Shard(TRANSACTIONS, allowed_lateness=3600)
  day0 = [_transaction(i, f'u{i:05d}', T0 + i * MIN) for i in range(300)]
  shard.arrive(day0)
  assert shard.flush.at == T0 + 299 * MIN
  assert len(shard.fire_flush()) == 300
  assert len(shard.retained()) == 300
  day8 = [_transaction(1000 + i, f'u{i:05d}', T0 + 8 * DAY + i * MIN)
          for i in range(3)]
  shard.arrive(day8)
  rows = shard.fire_flush()
  assert shard.retained() == ['tx000001000', 'tx000001001', 'tx000001002']
  # (at the next whole millisecond: Flink keeps timers in ms)
  assert shard.expire.at == T0 + 8 * DAY + 2 * MIN + 7 * DAY + HOUR + 1000
  # Their features are batch's: the day-0 rows are 8 days old, outside
  # every window (count_7d 0, seconds since previous capped at 7 d).
  expected = {r['transaction_id']: r for r in history_table(
      pa.Table.from_pylist(day0 + day8, schema=TRANSACTIONS.batch_schema()),
      TRANSACTIONS).to_pylist()}
  assert rows == [expected[r['transaction_id']] for r in rows]
  assert [r['user_id_count_7d'] for r in rows] == [0, 0, 0]
  shard.fire_expire()
  assert shard.retained() == []


def test_a_flush_appends_its_rows_and_computes_only_their_entities(
    monkeypatch):
  # Two flushes an hour apart, nothing to prune: the second appends its
  # rows to the history (the state commit carries 3 rows, not 303), and
  # history_table sees only the history of the flushed rows' users.
  from transforms import history_features  # pylint: disable=import-outside-toplevel
  shard = _Shard(TRANSACTIONS, allowed_lateness=3600)
  day0 = [_transaction(i, f'u{i:05d}', T0 + i * MIN) for i in range(300)]
  shard.arrive(day0)
  shard.fire_flush()
  seen = []
  real = history_features.history_table
  monkeypatch.setattr(history_features, 'history_table',
                      lambda records, *a: seen.append(records) or
                      real(records, *a))
  later = [_transaction(1000 + i, f'u{i:05d}', T0 + 6 * HOUR + i * MIN)
           for i in range(3)]
  shard.arrive(later)
  rows = shard.fire_flush()
  assert [b.num_rows for b in shard.history.read()] == [300, 3]
  assert sorted(set(seen[0].column('user_id').to_pylist())) == [
      'u00000', 'u00001', 'u00002']
  assert seen[0].num_rows == 6
  expected = {r['transaction_id']: r for r in real(
      pa.Table.from_pylist(day0 + later, schema=TRANSACTIONS.batch_schema()),
      TRANSACTIONS).to_pylist()}
  assert rows == [expected[r['transaction_id']] for r in rows]
  assert [r['user_id_count_24h'] for r in rows] == [1, 1, 1]


def test_the_history_is_compacted_before_its_pieces_pile_up(monkeypatch):
  # 100 flushes a minute apart, nothing old enough to prune (the retention
  # is 7 d 1 h): each appends a piece, and every flush reads them all, so
  # the history is rewritten as one piece at _REWRITE_AT_PIECES (8 here);
  # every row is still there and the features are still batch's.
  from transforms import history_features  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(history_features, '_REWRITE_AT_PIECES', 8)
  shard = _Shard(TRANSACTIONS, allowed_lateness=3600)
  records, rows = [], []
  for i in range(100):
    record = _transaction(i, f'u{i % 3:05d}', T0 + i * MIN)
    records.append(record)
    shard.arrive([record])
    rows += shard.fire_flush()
    assert len(shard.history.read()) < 8
  assert sorted(shard.retained()) == sorted(r['transaction_id']
                                            for r in records)
  expected = {r['transaction_id']: r for r in history_table(
      pa.Table.from_pylist(records, schema=TRANSACTIONS.batch_schema()),
      TRANSACTIONS).to_pylist()}
  assert len(rows) == 100
  assert rows == [expected[r['transaction_id']] for r in rows]
  assert max(r['user_id_count_1h'] for r in rows) == 20


def test_a_pending_row_keeps_what_it_needs_from_the_expire_timer():
  # u1's row at 6 d 23 h waits for its batch's newest (8 d) while the
  # watermark passes the expire timer day 0's row set (7 d 1 h): the
  # timer must keep what the waiting row needs (u1's day-0 row, 6 d 23 h
  # before it, inside its 7 d window).
  shard = _Shard(TRANSACTIONS, allowed_lateness=3600)
  shard.arrive([_transaction(1, 'u1', T0)])
  shard.fire_flush()
  shard.arrive([_transaction(2, 'u1', T0 + 7 * DAY - HOUR),
                _transaction(3, 'u2', T0 + 8 * DAY)])
  assert shard.expire.at < shard.flush.at
  shard.fire_expire()
  assert shard.retained() == ['tx000000001']
  rows = {r['transaction_id']: r for r in shard.fire_flush()}
  assert rows['tx000000002']['user_id_count_7d'] == 1
  # Then the flush of 8 d drops it: 8 d old, more than 7 d 1 h.
  assert shard.retained() == ['tx000000002', 'tx000000003']


def test_expiry_keeps_batch_features_for_events_up_to_the_lateness_late():
  # 200 users on day 0 (one every 3 min), a watermark jump to day 7, then
  # ten of them active again and u00050 at 7 d 10 h, flushed once the
  # watermark passes 7 d 10 h: that flush keeps rows down to 7 d 1 h
  # before it, i.e. from 9 h on day 0. By hand: u195's day-0 row is at 9 h
  # 45 min and its active one at 7 d 9 h 5 min; its late event at 7 d 9 h
  # 40 min, 50 min behind the watermark (allowed: 1 h), has both inside 7
  # d (the day-0 row 6 d 23 h 55 min back): count_7d 2, as in batch.
  # (Retention without the lateness would have dropped the day-0 row.)
  day0 = [_transaction(i, f'u{i:05d}', T0 + i * 3 * MIN)
          for i in range(200)]
  active = [_transaction(1000 + i, f'u{190 + i:05d}',
                         T0 + 7 * DAY + 9 * HOUR + i * MIN)
            for i in range(10)]
  active.append(_transaction(1010, 'u00050', T0 + 7 * DAY + 10 * HOUR))
  late = _transaction(2000, 'u00195', T0 + 7 * DAY + 9 * HOUR + 40 * MIN)
  closing = _transaction(3000, 'u00001', T0 + 7 * DAY + 11 * HOUR)
  stream = _stream()
  for start in range(0, 200, 50):
    stream.add_elements([_at(TRANSACTIONS, day0[start:start + 50])])
    stream.advance_watermark_to(Timestamp(
        micros=day0[start + 49]['event_time']))
  stream.advance_watermark_to(Timestamp(micros=T0 + 7 * DAY))
  stream.add_elements([_at(TRANSACTIONS, active)])
  stream.advance_watermark_to(Timestamp(
      micros=T0 + 7 * DAY + 10 * HOUR + 30 * MIN))
  stream.add_elements([_at(TRANSACTIONS, [late])])
  stream.add_elements([_at(TRANSACTIONS, [closing])])
  stream.advance_watermark_to(Timestamp(micros=T0 + 8 * DAY))
  stream.advance_watermark_to_infinity()
  records = day0 + active + [late, closing]
  expected = _batch_rows(TRANSACTIONS, records)
  assert [json.loads(r)['user_id_count_7d'] for r in expected
          if '"tx000002000"' in r] == [2]
  with _streaming() as p:
    assert_that(_stream_rows(p, stream, TRANSACTIONS, shards=2),
                equal_to(expected))
