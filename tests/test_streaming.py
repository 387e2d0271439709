"""Streaming: out-of-order and late events (TestStream), parity, replay."""

import glob
import json
import random

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

from pipelines import streaming as pipeline
from schemas.dataset import load_dataset, parse_duration
from transforms.aggregates import (AGGREGATES, LATE,
                                   StreamingEntityAggregates)
from transforms.common import DEAD_LETTER, VALID, micros_to_rfc3339
from transforms.history_features import (HistoryFeatures, StatefulHistoryFeatures,
                                history_features)
from transforms.parse import ParseAndValidate, StreamingParseAndValidate
from transforms.read import RawRecord, ReadRecords
from transforms.stream_sources import ReplayFile, decode_message, replay_order

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


def _at(record):
  return TimestampedValue(record, Timestamp(micros=record['event_time']))


def _json_line(record):
  line = dict(record)
  line['event_time'] = micros_to_rfc3339(record['event_time'])
  return json.dumps(line)


# History features -----------------------------------------------------------
def test_history_waits_for_the_watermark_and_expires_old_history():
  tx1 = _record(1, T0, 10.0)
  tx2 = _record(2, T0 + 30 * MIN, 20.0)
  tx3 = _record(3, T0 + 10 * MIN, 40.0)        # arrives after tx2
  tx4 = _record(4, T0 + 50 * MIN, 5.0)
  tx5 = _record(5, T0 + 50 * MIN, 7.0, country='FR')   # ties tx4
  tx6 = _record(6, T0 + 55 * MIN, 1.0)         # arrives 8 days later
  stream = (TestStream()
            .add_elements([_at(tx1), _at(tx2)])
            .add_elements([_at(tx3)])
            .advance_watermark_to(Timestamp(micros=T0 + 40 * MIN))
            .add_elements([_at(tx4), _at(tx5)])
            # Past the newest event + 7 d horizon + 1 h lateness: expired.
            .advance_watermark_to(Timestamp(micros=T0 + 8 * DAY + 2 * HOUR))
            .add_elements([_at(tx6)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    rows = (p | stream
            | StatefulHistoryFeatures(DATASET, allowed_lateness=3600)
            | beam.Map(lambda r: (r['transaction_id'], r['user_id_count_1h'],
                                  r['user_id_sum_1h'],
                                  r['user_id_is_new_country_7d'])))
    assert_that(rows, equal_to([
        ('tx000000001', 0, 0.0, 1),
        # tx3 (earlier in event time) arrived after tx2 but before the
        # watermark passed either: tx2 sees it, as in batch.
        ('tx000000002', 2, 50.0, 0),
        # tx3 sees tx1 only: tx2 is later in event time.
        ('tx000000003', 1, 10.0, 0),
        # tx4 and tx5 tie: each sees tx1, tx2, tx3 but not the other.
        ('tx000000004', 3, 70.0, 0),
        ('tx000000005', 3, 70.0, 1),
        # tx6 is 8 days late: the entity's history was cleared by the timer.
        ('tx000000006', 0, 0.0, 1),
    ]))


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


@pytest.mark.parametrize('arrival', ['in_order', 'shuffled'])
def test_streaming_history_equals_batch_history(tmp_path, arrival):
  # Shuffled: each chunk's events arrive in random order (as the dedupe
  # shuffle on a parallel runner delivers them), then the watermark passes.
  records = _history()
  with TestPipeline() as p:
    batches = [pa.RecordBatch.from_pylist(records[i:i + 250],
                                          schema=DATASET.batch_schema())
               for i in range(0, len(records), 250)]
    _ = (p | beam.Create(batches) | HistoryFeatures(DATASET)
         | beam.FlatMap(lambda batch: batch.to_pylist())
         | beam.Map(json.dumps, sort_keys=True)
         | beam.io.WriteToText(str(tmp_path / 'batch')))
  batch = [json.loads(line) for path in glob.glob(str(tmp_path / 'batch*'))
           for line in open(path, encoding='utf-8')]
  assert len(batch) == len(records)

  stream = TestStream()
  for start in range(0, len(records), 100):
    chunk = records[start:start + 100]
    if arrival == 'shuffled':
      chunk = random.Random(start).sample(chunk, len(chunk))
    stream.add_elements([_at(r) for r in chunk])
    stream.advance_watermark_to(
        Timestamp(micros=max(r['event_time'] for r in chunk)))
  stream.advance_watermark_to_infinity()
  with _streaming() as p:
    rows = (p | stream | StatefulHistoryFeatures(DATASET, 3600)
            | beam.Map(json.dumps, sort_keys=True))
    assert_that(rows, equal_to([json.dumps(r, sort_keys=True)
                                for r in batch]))


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
  # Hourly windows, 30 minutes of allowed lateness; processing time never
  # advances, so there are no early panes.
  a, b = _minute(1, 10, 10.0), _minute(2, 50, 20.0)
  c = _minute(3, 40, 5.0)           # behind the watermark, within lateness
  d = _minute(4, 80, 7.0)
  e = _minute(5, 30, 100.0)         # after the key's 01:30 timer fired
  f = _minute(6, 5, 1.0, user='u00002')   # first event of its key
  g = _minute(7, 160, 2.0, user='u00003')
  h = _minute(8, 65, 4.0, user='u00003')  # 95 min behind its key's newest
  i = _minute(9, 110, 3.0)
  stream = (TestStream()
            .add_elements([_at(a), _at(b)])
            .advance_watermark_to(Timestamp(micros=T0 + 65 * MIN))
            .add_elements([_at(c), _at(d), _at(g)])
            .advance_watermark_to(Timestamp(micros=T0 + 105 * MIN))
            .add_elements([_at(e), _at(f), _at(h), _at(i)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingEntityAggregates(
        DATASET, 'user_id', size=3600, period=3600, allowed_lateness=1800,
        early_firing=60)
    assert_that(out[AGGREGATES], equal_to_per_window({
        # On time with a and b, then c's late pane (panes accumulate).
        _window(0, 60): [_agg('u00001', 0, 2, 30.0, 'ON_TIME', 0),
                         _agg('u00001', 0, 3, 35.0, 'LATE', 1)],
        _window(60, 120): [_agg('u00001', 60, 2, 10.0, 'ON_TIME', 0),
                           # h: behind its key's newest event (02:40) but
                           # not behind the watermark (01:45): on time.
                           _agg('u00003', 60, 1, 4.0, 'ON_TIME', 0)],
        _window(120, 180): [_agg('u00003', 120, 1, 2.0, 'ON_TIME', 0)],
        # No window holds f: see the next assertion.
    }), label='aggregates')
    late = out[LATE] | beam.Map(lambda row: (
        row['error_kind'], row['field'],
        json.loads(row['raw'])['transaction_id'], row['message']))
    assert_that(late, equal_to([
        # The key's timer at 01:00 + 30 min fired at watermark 01:45.
        ('late', 'user_id', 'tx000000005',
         'user_id u00001: event at 2026-10-01T00:30:00Z is late: its first '
         'window ended 2026-10-01T01:00:00Z, + allowed lateness 1800s = '
         '2026-10-01T01:30:00Z, not after the watermark '
         '2026-10-01T01:30:00Z'),
        # f is absent on purpose: the documented gap. Its key had no clock
        # yet, so the rule admitted it, and the runner dropped it (its
        # window closed at 01:30 by the watermark, 01:45).
    ]), label='late')


def test_early_panes_fire_on_processing_time():
  stream = (TestStream()
            .add_elements([_at(_minute(1, 10, 10.0))])
            .advance_processing_time(61)
            .add_elements([_at(_minute(2, 20, 5.0))])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingEntityAggregates(
        DATASET, 'user_id', size=3600, period=3600, allowed_lateness=0,
        early_firing=60)
    assert_that(out[AGGREGATES], equal_to_per_window({
        _window(0, 60): [_agg('u00001', 0, 1, 10.0, 'EARLY', 0),
                         _agg('u00001', 0, 2, 15.0, 'ON_TIME', 1)],
    }))


# Parse and validate ---------------------------------------------------------
def _raw(position, record=None, text=None):
  if record is None:
    return decode_message(text.encode('utf-8'), 'pubsub:test')
  return RawRecord('pubsub:test', position, _json_line(record),
                   json.loads(_json_line(record)))


def test_decode_message():
  assert decode_message(b'{"a": 1}', 's') == RawRecord('s', -1, '{"a": 1}',
                                                       {'a': 1})
  assert decode_message(b'[1]', 's').error == 'a JSON line must be an object'
  assert decode_message(b'{nope', 's').error.startswith('not valid JSON')


def test_parse_dead_letters_and_drops_later_copies_within_the_horizon():
  tx1 = _record(1, T0, 10.0)
  tx2 = _record(2, T0 + HOUR, 20.0)
  stream = (TestStream(coder=beam.coders.PickleCoder())
            .add_elements([_raw(0, tx1), _raw(1, text='{broken')])
            .add_elements([_raw(2, tx1), _raw(3, tx2)])   # 2: duplicate
            # The watermark passes tx1 + the 1 h horizon: tx1 is forgotten.
            .advance_watermark_to(Timestamp(micros=T0 + 2 * HOUR))
            .add_elements([_raw(4, tx1)])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingParseAndValidate(DATASET, dedupe_horizon=3600)
    # Valid records leave stamped with their event time.
    assert_that(out[VALID] | 'Ids' >> beam.Map(
        lambda r, ts=beam.DoFn.TimestampParam: (r['transaction_id'],
                                                ts.micros)),
                equal_to([('tx000000001', T0), ('tx000000002', T0 + HOUR),
                          ('tx000000001', T0)]), label='valid')
    assert_that(out[DEAD_LETTER] | 'Kinds' >> beam.Map(
        lambda r: (r['error_kind'], r['position'], r['message'][:21])),
                equal_to([('malformed', -1, 'not valid JSON: Expec'),
                          ('duplicate', 2, 'id tx000000001 alread')]),
                label='dead')


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
    assert_that(stream[VALID] | 'StreamAmount' >> beam.Map(
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
                   ('WatermarkEvent', None), ('WatermarkEvent', None)]


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


def test_replay_end_to_end_writes_batch_equal_features_and_aggregates(
    tmp_path):
  records = _replay_input(tmp_path / 'tx.jsonl')
  out = tmp_path / 'out'
  summary = pipeline.run([
      '--input', str(tmp_path / 'tx.jsonl'), '--output_dir', str(out),
      '--replay_batch', '50'])
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
  """A stand-in model: feature rows -> {id, score}."""

  def expand(self, rows):
    return rows | beam.Map(lambda r: {'transaction_id': r['transaction_id'],
                                      'score': r['amount'] / 1000})


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
  KafkaIO's Impulse that ends the read's input and stalls the stream
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


def test_history_is_not_expired_by_a_timer_its_events_outdated():
  # One watermark step passes tx2's time and the expiry timer tx1 set (7 d
  # + 1 h after it). tx2 is 10 minutes short of 7 days after tx1: it must
  # see tx1, and once computed it moves the expiry on, so the old timer,
  # firing in the same step, must not clear the history tx4 needs.
  tx1 = _record(1, T0, 10.0)
  tx2 = _record(2, T0 + 7 * DAY - 10 * MIN, 20.0)
  tx3 = _record(3, T0 + 7 * DAY + 2 * HOUR, 5.0, user='u00002')
  tx4 = _record(4, T0 + 7 * DAY + 4 * HOUR, 1.0)
  stream = (TestStream()
            .add_elements([_at(tx1)])
            .advance_watermark_to(Timestamp(micros=T0 + 1 * MIN))
            .add_elements([_at(tx2), _at(tx3)])
            .advance_watermark_to(Timestamp(micros=T0 + 7 * DAY + 3 * HOUR))
            .add_elements([_at(tx4)])
            .advance_watermark_to(Timestamp(micros=T0 + 7 * DAY + 5 * HOUR))
            .advance_watermark_to_infinity())
  with _streaming() as p:
    rows = (p | stream
            | StatefulHistoryFeatures(DATASET, allowed_lateness=3600)
            | beam.Map(lambda r: (r['transaction_id'], r['user_id_count_7d'],
                                  r['user_id_sum_7d'])))
    assert_that(rows, equal_to([('tx000000001', 0, 0.0),
                                ('tx000000002', 1, 10.0),
                                ('tx000000003', 0, 0.0),
                                ('tx000000004', 1, 20.0)]))
