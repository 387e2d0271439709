"""Streaming on RecordBatches: out-of-order and late events (TestStream),
parity of features, scores and the online store with the batch job,
replay."""

import glob
import json
import os
import random

import numpy as np
import pyarrow.parquet as pq
import redis

import apache_beam as beam
import pytest
import pyarrow as pa
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to, equal_to_per_window
from apache_beam.transforms.window import IntervalWindow, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from pipelines import batch
from pipelines import streaming as pipeline
from pipelines import generate
from schemas.dataset import load_dataset, parse_duration
from transforms.aggregates import (AGGREGATES, LATE,
                                   StreamingEntityAggregates)
from transforms.common import DEAD_LETTER, VALID, micros_to_rfc3339
from transforms.history_features import (StatefulHistoryFeatures,
                                         _ShardHistoryFn, history_features,
                                         history_table)
from transforms.parse import (BatchValidator, ParseAndValidate,
                              RecordError, RecordValidator,
                              StreamingParseAndValidate)
from transforms.read import RawRecord, ReadRecords
from tests.redis_server import RedisServer
from transforms.stream_sources import (ReplayFile, _text_and_error,
                                       decode_message, message_batch,
                                       replay_order)

DATASET = load_dataset()
SIZE = parse_duration(DATASET.aggregates['window_size'])
PERIOD = parse_duration(DATASET.aggregates['window_period'])
MIN = 60 * 1_000_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T0 = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z


def _streaming():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


def _record(i, t, amount, user='u00001', merchant='m00001', country='US',
            label=0):
  return {'transaction_id': f'tx{i:09d}', 'user_id': user,
          'merchant_id': merchant, 'merchant_category': 'grocery',
          'amount': amount, 'currency': 'USD', 'channel': 'pos',
          'country': country, 'event_time': t, 'is_fraud': label}


def _at(*records):
  """A streaming batch of `records`, stamped with its earliest event time
  (as every streaming batch is)."""
  return TimestampedValue(
      pa.RecordBatch.from_pylist(list(records),
                                 schema=DATASET.batch_schema()),
      Timestamp(micros=min(r['event_time'] for r in records)))


def _stream():
  # Pickled: a RecordBatch has no Beam coder of its own.
  return TestStream(coder=beam.coders.PickleCoder())


def _rows(batches, label='Rows'):
  return batches | label >> beam.FlatMap(lambda b: b.to_pylist())


def _json_line(record):
  line = dict(record)
  line['event_time'] = micros_to_rfc3339(record['event_time'])
  return json.dumps(line)


# History features -----------------------------------------------------------
def _summary(row):
  """The history features the event-order tests check, with the id."""
  return (row['transaction_id'], row['user_id_count_1h'],
          row['user_id_sum_1h'], row['user_id_count_7d'],
          row['user_id_is_new_country_7d'])


def test_the_event_order_rule_of_history_features():
  """On time (the watermark had not passed it when it arrived): batch's
  row, in any arrival order. Late (behind the watermark), within the
  retention (7 d horizon + 1 h allowed lateness) of its entity's newest
  event: every earlier event that arrived before it, i.e. batch's row when
  no earlier event comes after it; rows already out do not count it. Later
  than that: the retained history only."""
  tx1 = _record(1, T0, 10.0)
  tx2 = _record(2, T0 + 30 * MIN, 20.0)
  tx3 = _record(3, T0 + 10 * MIN, 40.0)     # after tx2, on time
  tx4 = _record(4, T0 + 20 * MIN, 5.0)      # behind the watermark (40 min)
  tx5 = _record(5, T0 + 50 * MIN, 7.0, country='FR')
  tx6 = _record(6, T0 + 8 * DAY, 1.0)       # the newest moves 8 days on
  tx7 = _record(7, T0 + 55 * MIN, 2.0)      # 8 days behind it
  tx8 = _record(8, T0 + 8 * DAY + MIN, 3.0)
  stream = (_stream()
            .add_elements([_at(tx1)])
            .add_elements([_at(tx2)])
            # tx1's flush: tx2 waits (the watermark has not passed it) ...
            .advance_watermark_to(Timestamp(micros=T0 + 5 * MIN))
            # ... for tx3, earlier than tx2, arriving after it, on time.
            .add_elements([_at(tx3)])
            .advance_watermark_to(Timestamp(micros=T0 + 40 * MIN))
            .add_elements([_at(tx4)])
            .add_elements([_at(tx5)])
            .advance_watermark_to(Timestamp(micros=T0 + 60 * MIN))
            .add_elements([_at(tx6)])
            .advance_watermark_to(Timestamp(micros=T0 + 8 * DAY))
            .add_elements([_at(tx7)])
            .add_elements([_at(tx8)])
            # Past every event before the end, as a replay ends.
            .advance_watermark_to(Timestamp(micros=T0 + 9 * DAY))
            .advance_watermark_to_infinity())
  with _streaming() as p:
    rows = (_rows(p | stream
                  | StatefulHistoryFeatures(DATASET, allowed_lateness=3600))
            | beam.Map(_summary))
    assert_that(rows, equal_to([
        ('tx000000001', 0, 0.0, 0, 1),
        # tx3 (earlier in event time) arrived after tx2 and after tx1 was
        # computed, but before the watermark passed it: tx2 sees it, as in
        # batch; tx4 was late,
        # and tx2's row was out by then: it does not count tx4 (batch: 3).
        ('tx000000002', 2, 50.0, 2, 0),
        ('tx000000003', 1, 10.0, 1, 0),
        # tx4, late, sees tx1 and tx3, as in batch.
        ('tx000000004', 2, 50.0, 2, 0),
        # tx5 came after tx4: batch's row (tx1..tx4).
        ('tx000000005', 4, 75.0, 4, 1),
        ('tx000000006', 0, 0.0, 0, 1),
        # tx7 is 8 days behind tx6: tx1..tx5 were dropped (more than 7 d +
        # 1 h before tx6), so it sees none of them (batch: 5 in 1 h) ...
        ('tx000000007', 0, 0.0, 0, 1),
        # tx8 sees tx6 alone.
        ('tx000000008', 1, 1.0, 1, 0),
    ]))


def _batch_rows(records):
  """The batch definition's rows (history_table) of `records`."""
  table = pa.Table.from_pylist(records, schema=DATASET.batch_schema())
  return history_table(table, DATASET).to_pylist()


def _history(n_events=2000, n_users=50, seed=11):
  """Events over 20 days, on a minute grid so that ties are common."""
  rng = random.Random(seed)
  records = []
  for i in range(n_events):
    t = T0 + rng.randrange(20 * 24 * 60) * MIN
    records.append(_record(
        i, t, rng.choice([0.01, 1.5, 20.0, 99.99, 250.0, 1200.35]),
        user=f'u{rng.randrange(n_users):05d}',
        merchant=f'm{rng.randrange(8):05d}',
        country=rng.choice(['US', 'GB', 'FR'])))
  records.sort(key=lambda r: (r['event_time'], r['transaction_id']))
  return records


def test_features_on_arrival_count_what_arrived_before():
  """--history_features on_arrival: a row is computed as it arrives, with
  every earlier event of its entity that arrived before it; no wait for
  the watermark (none advances here until the end, yet every row is out
  before it). An earlier event arriving later is not counted by the rows
  already out; its own row is batch's."""
  tx1 = _record(1, T0, 10.0)
  tx2 = _record(2, T0 + 30 * MIN, 20.0)
  tx3 = _record(3, T0 + 10 * MIN, 40.0)     # after tx2
  tx5 = _record(5, T0 + 50 * MIN, 7.0, country='FR')
  stream = (_stream()
            .add_elements([_at(tx1)])
            .add_elements([_at(tx2)])
            .add_elements([_at(tx3)])
            .add_elements([_at(tx5)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    rows = (_rows(p | stream
                  | StatefulHistoryFeatures(DATASET, allowed_lateness=3600,
                                            on_arrival=True))
            | beam.Map(_summary))
    assert_that(rows, equal_to([
        ('tx000000001', 0, 0.0, 0, 1),
        # tx3 had not arrived: tx2 counts tx1 alone (batch: tx1 and tx3).
        ('tx000000002', 1, 10.0, 1, 0),
        ('tx000000003', 1, 10.0, 1, 0),
        ('tx000000005', 3, 70.0, 3, 1),
    ]))


@pytest.mark.parametrize('arrival,on_arrival', [
    ('in_order', False), ('shuffled', False), ('in_order', True)])
def test_streaming_history_equals_batch_history(arrival, on_arrival):
  # Shuffled: each chunk's events arrive in three batches in random order
  # (as the shuffles of a parallel runner deliver them), then the
  # watermark passes them. On arrival, an in-order stream gets batch's
  # rows too.
  records = _history()
  stream = _stream()
  for start in range(0, len(records), 100):
    chunk = records[start:start + 100]
    if arrival == 'shuffled':
      chunk = random.Random(start).sample(chunk, len(chunk))
      stream.add_elements([_at(*chunk[i:i + 34]) for i in (68, 0, 34)])
    else:
      stream.add_elements([_at(*chunk)])
    stream.advance_watermark_to(
        Timestamp(micros=max(r['event_time'] for r in chunk)))
  stream.advance_watermark_to_infinity()
  with _streaming() as p:
    rows = (_rows(p | stream | StatefulHistoryFeatures(
        DATASET, 3600, num_shards=3, on_arrival=on_arrival))
            | beam.Map(json.dumps, sort_keys=True))
    assert_that(rows, equal_to([json.dumps(r, sort_keys=True)
                                for r in _batch_rows(records)]))


# Windowed aggregates and late data ------------------------------------------
def _window(start_minute, end_minute):
  return IntervalWindow(Timestamp(micros=T0 + start_minute * MIN),
                        Timestamp(micros=T0 + end_minute * MIN))


def _agg(user, start_minute, count, total, pane, index, is_fraud_rate=0.0):
  return {'user_id': user,
          'window_start': micros_to_rfc3339(T0 + start_minute * MIN),
          'window_end': micros_to_rfc3339(T0 + (start_minute + 60) * MIN),
          'count': count, 'total_amount': total, 'mean_amount': total / count,
          'is_fraud_rate': is_fraud_rate, 'pane': pane, 'pane_index': index}


def _minute(i, minute, amount, user='u00001'):
  return _record(i, T0 + minute * MIN, amount, user=user)


def test_aggregate_panes_and_late_events_per_window():
  # Hourly windows, 30 minutes of allowed lateness, one shard; processing
  # time never advances, so there are no early panes.
  a, b = _minute(1, 10, 10.0), _minute(2, 50, 20.0)
  c = _minute(3, 40, 5.0)           # behind the watermark, within lateness
  d = _minute(4, 80, 7.0)
  e = _minute(5, 30, 100.0)         # after the shard's 01:30 timer fired
  f = _minute(6, 5, 1.0, user='u00002')   # first event of its key
  g = _minute(7, 160, 2.0, user='u00003')
  h = _minute(8, 65, 4.0, user='u00003')  # 95 min behind its key's newest
  i = _minute(9, 110, 3.0)
  stream = (_stream()
            .add_elements([_at(a, b)])
            .advance_watermark_to(Timestamp(micros=T0 + 65 * MIN))
            .add_elements([_at(c, d, g)])
            .advance_watermark_to(Timestamp(micros=T0 + 105 * MIN))
            .add_elements([_at(e, f, h, i)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingEntityAggregates(
        DATASET, 'user_id', size=3600, period=3600, allowed_lateness=1800,
        early_firing=60, num_shards=1)
    assert_that(_rows(out[AGGREGATES]), equal_to_per_window({
        # On time with a and b, then c's late pane (panes accumulate).
        _window(0, 60): [_agg('u00001', 0, 2, 30.0, 'ON_TIME', 0),
                         _agg('u00001', 0, 3, 35.0, 'LATE', 1)],
        # One on-time pane of the shard, a row per key: h is behind its
        # key's newest event (02:40) but not behind the watermark: on time.
        _window(60, 120): [_agg('u00001', 60, 2, 10.0, 'ON_TIME', 0),
                           _agg('u00003', 60, 1, 4.0, 'ON_TIME', 0)],
        _window(120, 180): [_agg('u00003', 120, 1, 2.0, 'ON_TIME', 0)],
    }), label='aggregates')
    late = _rows(out[LATE], 'LateRows') | beam.Map(lambda row: (
        row['error_kind'], row['field'],
        json.loads(row['raw'])['transaction_id'], row['message']))
    message = ('user_id {}: event at 2026-10-01T00:{}:00Z is late: its '
               'first window ended 2026-10-01T01:00:00Z, + allowed lateness '
               '1800s = 2026-10-01T01:30:00Z, not after the watermark '
               '2026-10-01T01:30:00Z')
    assert_that(late, equal_to([
        # The shard's timer at 01:00 + 30 min fired at watermark 01:45:
        # e and f (its key's first event, but the shard knows the clock)
        # are late.
        ('late', 'user_id', 'tx000000005', message.format('u00001', '30')),
        ('late', 'user_id', 'tx000000006', message.format('u00002', '05')),
    ]), label='late')


def test_early_panes_fire_on_processing_time():
  stream = (_stream()
            .add_elements([_at(_minute(1, 10, 10.0))])
            .advance_processing_time(61)
            .add_elements([_at(_minute(2, 20, 5.0))])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingEntityAggregates(
        DATASET, 'user_id', size=3600, period=3600, allowed_lateness=0,
        early_firing=60)
    assert_that(_rows(out[AGGREGATES]), equal_to_per_window({
        _window(0, 60): [_agg('u00001', 0, 1, 10.0, 'EARLY', 0),
                         _agg('u00001', 0, 2, 15.0, 'ON_TIME', 1)],
    }))


# Parse and validate ---------------------------------------------------------
def _messages(*messages, at=T0):
  """One raw batch of Pub/Sub messages (records or texts), stamped `at`."""
  texts, errors = zip(*(_text_and_error(
      m.encode('utf-8') if isinstance(m, str) else m) for m in messages))
  return TimestampedValue(message_batch(texts, errors, 'pubsub:test',
                                        DATASET), Timestamp(micros=at))


def test_decode_message():
  assert decode_message(b'{"a": 1}', 's') == RawRecord('s', -1, '{"a": 1}',
                                                       {'a': 1})
  assert decode_message(b'[1]', 's').error == 'a JSON line must be an object'
  assert decode_message(b'{nope', 's').error.startswith('not valid JSON')


def test_a_batch_of_messages_validates_as_each_message_alone():
  # pyarrow decodes the batch at once; a message it refuses (not JSON, not
  # an object, not UTF-8, a number as a string, a newline inside) is
  # decoded alone, as decode_message does: the same valid records and
  # dead-letter rows either way.
  good = _json_line(_record(1, T0, 10.0))
  messages = [good, '{nope', '[1]', b'\xff\xfe',
              good.replace('10.0', '"12.5"').replace('001"', '002"'),
              good.replace(', ', ',\n ').replace('001"', '003"'),
              # Not allowed, over two lines: its dead-letter text is the
              # message as it came.
              good.replace(', ', ',\n ').replace('"pos"', '"nope"'),
              good.replace('tx000000001', 'bad id')]
  raw = message_batch(*zip(*(_text_and_error(
      m.encode('utf-8') if isinstance(m, str) else m) for m in messages)),
                      'pubsub:test', DATASET)
  valid, dead = BatchValidator(DATASET).validate(raw)
  alone_valid, alone_dead = [], []
  for m in messages:
    record = decode_message(m.encode('utf-8') if isinstance(m, str) else m,
                            'pubsub:test')
    try:
      alone_valid.append(RecordValidator(DATASET).validate(record))
    except RecordError as e:
      alone_dead.append((e.kind, e.message, record.text))
  names = DATASET.batch_schema().names
  key = lambda r: r['transaction_id']
  assert sorted(pa.Table.from_batches([valid]).select(names).to_pylist(),
                key=key) == alone_valid
  assert [r['transaction_id'] for r in alone_valid] == [
      'tx000000001', 'tx000000002', 'tx000000003']
  assert [(d['error_kind'], d['message'], d['raw']) for d in dead] == (
      alone_dead)
  assert len(alone_dead) == 5 and {d['position'] for d in dead} == {-1}


def test_parse_dead_letters_and_drops_later_copies_within_the_horizon():
  tx1 = _json_line(_record(1, T0, 10.0))
  tx2 = _json_line(_record(2, T0 + HOUR, 20.0))
  tx3 = _json_line(_record(3, T0 + HOUR + 1, 20.0))
  stream = (_stream()
            .add_elements([_messages(tx1, '{broken')])
            .add_elements([_messages(tx1, tx2)])      # tx1: a later copy
            # Events up to 1 h after tx1: still remembered.
            .add_elements([_messages(tx1)])
            # tx3 moves the stream past tx1 + the 1 h horizon: tx1 is
            # forgotten, and a copy is not recognised.
            .add_elements([_messages(tx3, tx1)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    # One shard: an id is forgotten once its shard's newest event is more
    # than the horizon after it (with more shards, tx3 may go to another).
    out = p | stream | StreamingParseAndValidate(DATASET, dedupe_horizon=3600,
                                                 num_shards=1)
    # Valid batches leave stamped with their earliest event time.
    assert_that(out[VALID] | 'Ids' >> beam.FlatMap(
        lambda b, ts=beam.DoFn.TimestampParam: [
            (r['transaction_id'], ts.micros) for r in b.to_pylist()]),
                equal_to([('tx000000001', T0), ('tx000000002', T0),
                          ('tx000000003', T0), ('tx000000001', T0)]),
                label='valid')
    assert_that(_rows(out[DEAD_LETTER], 'DeadRows') | 'Kinds' >> beam.Map(
        lambda r: (r['error_kind'], r['position'], r['message'])),
                equal_to([('malformed', -1, 'not valid JSON: Expecting '
                           'property name enclosed in double quotes: line 1 '
                           'column 2 (char 1)'),
                          ('duplicate', -1, 'id tx000000001 already read at '
                           'pubsub:test:-1'),
                          ('duplicate', -1, 'id tx000000001 already read at '
                           'pubsub:test:-1')]),
                label='dead')


def test_a_dedupe_sharded_by_entity_keeps_each_entity_in_one_shard():
  """shard_field (what --history_features on_arrival uses): the valid rows
  travel keyed by the shard of their user, so a runner's channels keep a
  user's arrival order up to the history step; copies still meet."""
  from transforms.common import shard_of
  from transforms.parse import _ValidateAndShard
  records = [_record(i, T0 + i * MIN, 1.0, user=f'u{i % 5:05d}')
             for i in range(40)]
  validate = _ValidateAndShard(DATASET, None, 4, shard_field='user_id')
  validate.setup()
  raw = _messages(*[_json_line(r) for r in records]).value
  keyed = [out for out in validate.process(raw)
           if not isinstance(out, beam.pvalue.TaggedOutput)]
  keyed = [getattr(out, 'value', out) for out in keyed]
  assert sum(b.num_rows for _, b in keyed) == 40
  for shard, rows in keyed:
    users = rows.column('user_id')
    assert set(shard_of(users, 4).tolist()) == {shard}
  assert len({u for _, b in keyed for u in b.column('user_id').to_pylist()}
             ) == 5

  tx1 = _json_line(_record(1, T0, 10.0, user='u00001'))
  tx2 = _json_line(_record(2, T0 + MIN, 20.0, user='u00002'))
  stream = (_stream()
            .add_elements([_messages(tx1, tx2)])
            .add_elements([_messages(tx2, tx1)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingParseAndValidate(
        DATASET, num_shards=4, shard_field='user_id')
    assert_that(_rows(out[VALID], 'Valid') | 'Ids' >> beam.Map(
        lambda r: r['transaction_id']),
                equal_to(['tx000000001', 'tx000000002']), label='valid')
    assert_that(_rows(out[DEAD_LETTER], 'Dead') | 'Kinds' >> beam.Map(
        lambda r: r['error_kind']), equal_to(['duplicate'] * 2),
                label='dead')

  # The cost, as the README says: one id under two users of two shards is
  # not recognised as a copy (sharded by id, the second is dead-lettered).
  users = pa.array([f'u{i:05d}' for i in range(20)])
  shards = shard_of(users, 4)
  a, b = users[0].as_py(), users[int(np.flatnonzero(shards != shards[0])[0])
                                  ].as_py()
  first = _json_line(_record(7, T0, 10.0, user=a))
  other = _json_line(_record(7, T0 + MIN, 10.0, user=b))
  for field, valid in (('user_id', ['tx000000007'] * 2),
                       (None, ['tx000000007'])):
    stream = (_stream().add_elements([_messages(first)])
              .add_elements([_messages(other)])
              .advance_watermark_to_infinity())
    with _streaming() as p:
      out = p | stream | StreamingParseAndValidate(
          DATASET, num_shards=4, shard_field=field)
      assert_that(_rows(out[VALID], 'Valid') | 'Ids' >> beam.Map(
          lambda r: r['transaction_id']), equal_to(valid), label='valid')


def test_batch_and_a_replay_keep_the_same_copy_of_a_duplicate(tmp_path):
  """One rule for both: the copy with the earliest event time wins. The
  later copy in the file is the earlier event here."""
  path = tmp_path / 'dup.jsonl'
  late, early = _record(1, T0 + 2 * HOUR, 1.0), _record(1, T0, 2.0)
  path.write_text(_json_line(late) + '\n' + _json_line(early) + '\n')
  with TestPipeline() as p:
    batch = (p | ReadRecords(str(path), DATASET)
             | ParseAndValidate(DATASET))
    assert_that(batch[VALID] | beam.FlatMap(lambda b: b.to_pylist())
                | 'BatchAmount' >> beam.Map(lambda r: r['amount']),
                equal_to([2.0]))
  with _streaming() as p:
    stream = (p | ReplayFile(str(path), DATASET)
              | StreamingParseAndValidate(DATASET))
    assert_that(_rows(stream[VALID]) | 'StreamAmount' >> beam.Map(
        lambda r: r['amount']), equal_to([2.0]))


# Replay ---------------------------------------------------------------------
def test_replay_order_puts_unreadable_records_next_to_their_neighbours():
  late_first = _record(1, T0 + HOUR, 1.0)
  early = _record(2, T0, 2.0)
  raws = [RawRecord('f', 0, _json_line(late_first),
                    json.loads(_json_line(late_first))),
          RawRecord('f', 1, '{oops', None, 'not valid JSON'),
          RawRecord('f', 2, _json_line(early), json.loads(_json_line(early)))]
  assert [(t, raw.position) for t, raw in replay_order(raws, DATASET)] == [
      (T0, 2), (T0 + HOUR, 0), (T0 + HOUR, 1)]


def test_replay_speed_advances_processing_time_by_event_time_over_speed(
    tmp_path):
  path = tmp_path / 'tx.jsonl'
  path.write_text('\n'.join(_json_line(_record(i, T0 + i * HOUR, 1.0))
                            for i in range(5)) + '\n', encoding='utf-8')
  events = ReplayFile(str(path), DATASET, speed=3600, batch=2).test_stream()
  steps = [(type(e).__name__, getattr(e, 'advance_by', None))
           for e in events._events]
  # Batches end at 01:00, 03:00 and 04:00: 2 h and 1 h of event time are 2 s
  # and 1 s of processing time at 3600x.
  assert steps == [('ElementEvent', None), ('WatermarkEvent', None),
                   ('ProcessingTimeEvent', 2), ('ElementEvent', None),
                   ('WatermarkEvent', None),
                   ('ProcessingTimeEvent', 1), ('ElementEvent', None),
                   ('WatermarkEvent', None), ('WatermarkEvent', None),
                   ('WatermarkEvent', None)]


def _replay_input(path, n_records=300, n_users=10, seed=5):
  """Records over 3 days in shuffled file order, with 2 broken lines and a
  duplicate id. Returns the valid records."""
  rng = random.Random(seed)
  records = [_record(i, T0 + rng.randrange(3 * 24 * 60) * MIN,
                     rng.choice([3.5, 20.0, 75.25, 410.0]),
                     user=f'u{rng.randrange(n_users):05d}',
                     merchant=f'm{rng.randrange(5):05d}',
                     label=rng.choice([0, 0, 0, 1]))
             for i in range(n_records)]
  lines = [_json_line(r) for r in records]
  rng.shuffle(lines)
  lines[10:10] = ['{not json', '{"transaction_id": "tx1", "amount": "x"}']
  lines.append(_json_line(records[0]))                # duplicate id
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return records


def _read_rows(folder):
  return [json.loads(line) for path in sorted(glob.glob(f'{folder}/*.jsonl'))
          for line in open(path, encoding='utf-8')]


def _sliding_totals(records, key, size, period):
  """(key, window_start, window_end) -> (count, total) by brute force."""
  totals = {}
  for r in records:
    t = r['event_time'] // 1_000_000
    last = t - t % period
    for start in range(last - size + period, last + period, period):
      k = (r[key], micros_to_rfc3339(start * 1_000_000),
           micros_to_rfc3339((start + size) * 1_000_000))
      count, cents = totals.get(k, (0, 0))
      totals[k] = (count + 1, cents + round(r['amount'] * 100))
  return {k: (count, cents / 100) for k, (count, cents) in totals.items()}


@pytest.mark.parametrize('when', ['on_watermark', 'on_arrival'])
def test_replay_end_to_end_writes_batch_equal_features_and_aggregates(
    tmp_path, when):
  records = _replay_input(tmp_path / 'tx.jsonl')
  out = tmp_path / 'out'
  summary = pipeline.run([
      '--input', str(tmp_path / 'tx.jsonl'), '--output_dir', str(out),
      '--replay_batch', '50', '--history_features', when])
  root = out / 'streaming'

  # One feature row per valid event, equal to the batch definition.
  features = _read_rows(root / 'features')
  assert sorted(r['transaction_id'] for r in features) == sorted(
      r['transaction_id'] for r in records)
  expected = []
  for user in {r['user_id'] for r in records}:
    mine = [r for r in records if r['user_id'] == user]
    for r, f in zip(mine, history_features(mine, DATASET)):
      expected.append(dict(r, **f))
  key = lambda r: r['transaction_id']
  assert sorted(features, key=key) == sorted(expected, key=key)

  dead = _read_rows(root / 'dead_letter')
  assert sorted(r['error_kind'] for r in dead) == [
      'duplicate', 'malformed', 'pattern_mismatch']

  # The last pane of every window holds the complete batch aggregate.
  for field in ('user_id', 'merchant_id'):
    last = {}
    for row in _read_rows(root / 'aggregates' / field):
      k = (row[field], row['window_start'], row['window_end'])
      if k not in last or row['pane_index'] > last[k]['pane_index']:
        last[k] = row
    assert {k: (r['count'], r['total_amount']) for k, r in last.items()} == (
        _sliding_totals(records, field, SIZE, PERIOD))

  assert summary['records_read'] == 303
  assert summary['records_valid'] == 300
  assert summary['records_dead_lettered'] == 3
  assert summary['records_late'] == 0
  assert summary['records_accounted_for']
  assert json.loads((root / 'run_summary.json').read_text()) == summary


def test_main_exits_2_with_one_line_on_bad_input(tmp_path, capsys):
  assert pipeline.main(['--input', str(tmp_path / 'missing.jsonl'),
                        '--output_dir', str(tmp_path)]) == 2
  assert pipeline.main(['--input', str(tmp_path / 'missing.jsonl'),
                        '--allowed_lateness', 'soon']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith('error: --input matched no files')
  assert err[1].startswith('error: --allowed_lateness: bad duration')


class _AmountScorer(beam.PTransform):
  """A stand-in model: feature batches -> batches of {id, score}."""

  def expand(self, batches):
    return batches | beam.Map(lambda b: pa.RecordBatch.from_arrays(
        [b.column('transaction_id'),
         pa.compute.divide(b.column('amount'), 1000.0)],
        names=['transaction_id', 'score']))


def test_scorer_hook_writes_one_prediction_per_valid_event(tmp_path):
  records = _replay_input(tmp_path / 'tx.jsonl', n_records=60, n_users=3)
  options = PipelineOptions(['--input', str(tmp_path / 'tx.jsonl'),
                             '--output_dir', str(tmp_path / 'out')])
  options.view_as(StandardOptions).streaming = True
  with beam.Pipeline(options=options) as p:
    built = pipeline.build_pipeline(p, options, DATASET,
                                    scorer=_AmountScorer())
  assert built['records_replayed'] == 63
  predictions = _read_rows(tmp_path / 'out' / 'streaming' / 'predictions')
  assert sorted((r['transaction_id'], r['score']) for r in predictions) == (
      sorted((r['transaction_id'], r['amount'] / 1000) for r in records))


def test_pubsub_pipeline_builds_with_topics():
  options = PipelineOptions([
      '--input_subscription', 'projects/my-project/subscriptions/tx',
      '--output_topic', 'projects/my-project/topics/scores',
      '--dead_letter_topic', 'projects/my-project/topics/dead'])
  options.view_as(StandardOptions).streaming = True
  p = beam.Pipeline(options=options)
  built = pipeline.build_pipeline(p, options, DATASET)
  labels = {t.full_label for t in p.transforms_stack[0].parts}
  assert {'ReadPubSub', 'Publish', 'PublishDeadLetters'} <= labels
  assert built['records_replayed'] is None and built['predictions'] is None


def test_unbounded_kafka_read_on_flink_keeps_sources_up():
  """Without checkpointing Flink shuts a finished source down at once; for
  the Kafka read's Impulse that ends the read's input and stalls the stream
  (pipeline.keep_sources_up). The flag is set, and sent to the job server,
  for an unbounded Kafka read on Flink only; a given value is kept."""
  kafka = ['--bootstrap_servers', '127.0.0.1:9092', '--input_topic', 't']
  cases = [(['--runner', 'FlinkRunner'] + kafka, 10**15),
           (['--runner', 'FlinkRunner', '--max_num_records', '5'] + kafka,
            None),
           (['--runner', 'FlinkRunner',
             '--shutdown_sources_after_idle_ms', '7'] + kafka, 7),
           (['--runner', 'DirectRunner'] + kafka, None)]
  for argv, want in cases:
    options = PipelineOptions(argv)
    pipeline.keep_sources_up(
        options, pipeline.flags(options, pipeline.StreamingOptions))
    sent = options.get_all_options(drop_default=True)
    assert sent.get('shutdown_sources_after_idle_ms') == want, argv


def test_flink_bundles_and_shards_default_to_bigger_batches():
  """On Flink a bundle holds up to FLINK_BUNDLE_SIZE events and stays open
  FLINK_BUNDLE_MS unless --max_bundle_size / --max_bundle_time_mills say
  otherwise (Flink's 1,000 cut a busy second into small batches; its 1 s
  held every step's outputs); shards: one on the DirectRunner,
  STREAM_SHARDS elsewhere, --stream_shards over both."""
  cases = [(['--runner', 'FlinkRunner'], pipeline.FLINK_BUNDLE_SIZE,
            pipeline.FLINK_BUNDLE_MS),
           (['--runner', 'FlinkRunner', '--max_bundle_size', '70',
             '--max_bundle_time_mills', '500'], 70, 500),
           (['--runner', 'DirectRunner'], None, None)]
  for argv, size, mills in cases:
    options = PipelineOptions(argv)
    pipeline.bigger_bundles(options)
    sent = options.get_all_options(drop_default=True)
    assert sent.get('max_bundle_size') == size, argv
    assert sent.get('max_bundle_time_mills') == mills, argv
  assert pipeline.stream_shards(PipelineOptions(['--runner', 'FlinkRunner'])
                                ) == pipeline.STREAM_SHARDS
  assert pipeline.stream_shards(PipelineOptions([])) == 1
  assert pipeline.stream_shards(PipelineOptions(
      ['--runner', 'FlinkRunner', '--stream_shards', '3'])) == 3
  with pytest.raises(pipeline.InputError, match="--stream_shards"):
    pipeline.stream_shards(PipelineOptions(['--stream_shards', '0']))


def test_a_kafka_stream_on_flink_submits_with_the_job_conf(monkeypatch):
  """The job server a Kafka stream on Flink starts reads Flink's job
  configuration (buffer timeout) from runners/flink_job_conf, while the job
  is submitted only; a FLINK_CONF_DIR the user set is kept."""
  monkeypatch.delenv('FLINK_CONF_DIR', raising=False)
  kafka = ['--bootstrap_servers', '127.0.0.1:9092', '--input_topic', 't']
  seen = []
  for argv in (['--runner', 'FlinkRunner'] + kafka,
               ['--runner', 'FlinkRunner', '--input', 'x.jsonl'],
               ['--runner', 'DirectRunner'] + kafka):
    options = PipelineOptions(argv)
    with pipeline.flink_job_conf(
        options, pipeline.flags(options, pipeline.StreamingOptions)):
      seen.append(os.environ.get('FLINK_CONF_DIR'))
    assert 'FLINK_CONF_DIR' not in os.environ
  assert seen == [pipeline.FLINK_JOB_CONF, None, None]
  with open(os.path.join(pipeline.FLINK_JOB_CONF, 'config.yaml'),
            encoding='utf-8') as f:
    assert 'execution.buffer-timeout.interval: 5 ms' in f.read()
  monkeypatch.setenv('FLINK_CONF_DIR', '/mine')
  options = PipelineOptions(['--runner', 'FlinkRunner'] + kafka)
  with pipeline.flink_job_conf(
      options, pipeline.flags(options, pipeline.StreamingOptions)):
    assert os.environ['FLINK_CONF_DIR'] == '/mine'
  assert os.environ['FLINK_CONF_DIR'] == '/mine'


def test_history_is_not_expired_by_a_timer_its_events_outdated():
  # One watermark step passes tx2's time and the expiry timer tx1 set (7 d
  # + 1 h after it). tx2 is 10 minutes short of 7 days after tx1: it must
  # see tx1, and once computed it moves the expiry on, so the old timer,
  # firing in the same step, must not clear the history tx4 needs.
  tx1 = _record(1, T0, 10.0)
  tx2 = _record(2, T0 + 7 * DAY - 10 * MIN, 20.0)
  tx3 = _record(3, T0 + 7 * DAY + 2 * HOUR, 5.0, user='u00002')
  tx4 = _record(4, T0 + 7 * DAY + 4 * HOUR, 1.0)
  stream = (_stream()
            .add_elements([_at(tx1)])
            .advance_watermark_to(Timestamp(micros=T0 + 1 * MIN))
            .add_elements([_at(tx2, tx3)])
            .advance_watermark_to(Timestamp(micros=T0 + 7 * DAY + 3 * HOUR))
            .add_elements([_at(tx4)])
            .advance_watermark_to(Timestamp(micros=T0 + 7 * DAY + 5 * HOUR))
            .advance_watermark_to_infinity())
  with _streaming() as p:
    rows = (_rows(p | stream
                  | StatefulHistoryFeatures(DATASET, allowed_lateness=3600))
            | beam.Map(lambda r: (r['transaction_id'], r['user_id_count_7d'],
                                  r['user_id_sum_7d'])))
    assert_that(rows, equal_to([('tx000000001', 0, 0.0),
                                ('tx000000002', 1, 10.0),
                                ('tx000000003', 0, 0.0),
                                ('tx000000004', 1, 20.0)]))


class _Cell:
  """A ReadModifyWrite state or a timer of a DoFn run by hand."""

  def __init__(self):
    self.value = None

  def read(self):
    return self.value

  def write(self, value):
    self.value = value

  set = write

  def clear(self):
    self.value = None


class _Bag(_Cell):

  def read(self):
    return list(self.value or [])

  def add(self, item):
    self.value = (self.value or []) + [item]


def test_history_flushes_events_stamped_finer_than_flinks_milliseconds():
  # Flink keeps timers in milliseconds: a timer set at ...123456 us fires
  # at ...123000. The flush timer must be at a whole millisecond at or
  # after the batch's newest event, so that the rows it waits for are
  # ready when it fires (they waited forever on Flink).
  fn = _ShardHistoryFn(DATASET, DATASET.histories[0], 3600)
  records = [_record(1, T0 + 123_456, 10.0), _record(2, T0 + 124_001, 5.0)]
  pending, flush_at, history, flush = _Bag(), _Cell(), _Bag(), _Cell()
  fn.process((0, pa.RecordBatch.from_pylist(
      records, schema=DATASET.batch_schema())), pending, flush_at, flush)
  fired = Timestamp(micros=flush.value.micros // 1000 * 1000)  # Flink's ms
  assert fired.micros >= T0 + 124_001
  out = list(fn.flush_ready(fired, pending, flush_at, history, flush,
                           _Cell()))   # the expire timer
  rows = [r for batch in out for r in batch.value.to_pylist()]
  assert sorted(r['transaction_id'] for r in rows) == [
      'tx000000001', 'tx000000002']
  assert pending.read() == []


# The stream against the batch job: features, scores, the online store ------
def parquet_rows(folder, key):
  """The rows of a batch output folder, timestamps as int epoch micros (as
  the stream writes them), sorted by `key`."""
  table = pa.concat_tables([pq.read_table(path) for path in sorted(
      glob.glob(f'{folder}/*.parquet'))])
  columns = [c.cast(pa.int64()) if pa.types.is_timestamp(c.type) else c
             for c in table.columns]
  rows = pa.Table.from_arrays(columns, names=table.column_names).to_pylist()
  return sorted(rows, key=lambda r: r[key])


def store_contents(url):
  """Every key of a Redis database and its value (hashes, sorted sets)."""
  client = redis.Redis.from_url(url)
  out = {}
  for key in client.keys('*'):
    kind = client.type(key)
    out[key] = (client.hgetall(key) if kind == b'hash' else
                client.zrange(key, 0, -1, withscores=True))
  return out


def assert_stream_equals_batch(stream_root, batch_out, id_field):
  """Feature rows and predictions (scores, labels, model version) of the
  stream equal the batch job's, row for row."""
  features = sorted(_read_rows(f'{stream_root}/features'),
                    key=lambda r: r[id_field])
  expected = parquet_rows(f'{batch_out}/features', id_field)
  assert len(features) == len(expected) > 0
  assert features == expected
  predictions = sorted(_read_rows(f'{stream_root}/predictions'),
                       key=lambda r: r[id_field])
  expected = parquet_rows(f'{batch_out}/predictions', id_field)
  assert [r[id_field] for r in predictions] == [r[id_field] for r in expected]
  np.testing.assert_array_equal([r['score'] for r in predictions],
                                [r['score'] for r in expected])
  # A stream does not know which rows trained the model: it says `scored`
  # where the batch run that trained it says train or eval.
  assert {r['split'] for r in predictions} == {'scored'}
  unsplit = lambda rows: [{k: v for k, v in r.items() if k != 'split'}
                          for r in rows]
  assert unsplit(predictions) == unsplit(expected)


@pytest.fixture(scope='module')
def batch_job(tmp_path_factory):
  """The batch job on 1,500 generated transactions and 2 broken lines: it
  trains its model, scores every record and materialises the online store
  (database 0 of a throwaway Redis)."""
  tmp = tmp_path_factory.mktemp('batch-job')
  data = tmp / 'tx.jsonl'
  assert generate.run(['--output', str(data), '--rows', '1500', '--seed',
                       '4', '--days', '10', '--broken', '2']) == 0
  with RedisServer(tmp / 'redis') as server:
    summary = batch.run(['--input', str(data), '--output_dir',
                         str(tmp / 'out'), '--online_store', server.url(0),
                         # gbt: trees score a row alone, bit-equal in any
                         # batch (logreg's dot products round by batch size).
                         '--model_type', 'gbt'])
    assert summary['status'] == 'ok'
    yield {'data': str(data), 'out': str(tmp / 'out'), 'redis': server,
           'summary': summary}


def test_the_stream_scores_and_stores_what_the_batch_job_does(batch_job,
                                                              tmp_path):
  out = tmp_path / 'stream'
  server = batch_job['redis']
  summary = pipeline.run([
      '--input', batch_job['data'], '--output_dir', str(out),
      '--model_dir', f'{batch_job["out"]}/model', '--online_store',
      server.url(1), '--replay_batch', '400'])
  assert summary['records_valid'] == batch_job['summary']['records_valid']
  assert_stream_equals_batch(out / 'streaming', batch_job['out'],
                             DATASET.id_field)
  store = store_contents(server.url(1))
  assert len(store) > 0
  assert store == store_contents(server.url(0))
