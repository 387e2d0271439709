"""Windowed entity aggregates: hand-computed values per window, batched
aggregates against per-record Beam windowing, the streaming form."""

import json
import random

import numpy as np

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

from schemas.dataset import load_dataset
from transforms.aggregates import (AGGREGATES, COMPACT_AT, LATE,
                                   EntityAggregates,
                                   StreamingEntityAggregates, SumPartials,
                                   _ToPaneRows, first_window_end,
                                   partial_schema)
from transforms.common import micros_to_rfc3339

DATASET = load_dataset()
SCHEMA = DATASET.batch_schema()
T0 = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z
MIN = 60 * 1_000_000


def _record(i, minute, amount, user='u00001', label=0, merchant='m00001'):
  return {'transaction_id': f'tx{i:09d}', 'user_id': user,
          'merchant_id': merchant, 'merchant_category': 'grocery',
          'amount': amount, 'currency': 'USD', 'channel': 'pos',
          'country': 'US', 'event_time': T0 + int(minute * MIN),
          'is_fraud': label}


def _batches(*groups):
  return [pa.RecordBatch.from_pylist(records, schema=SCHEMA)
          for records in groups]


TX1 = _record(1, 10, 10.10)               # 00:10
TX2 = _record(2, 50, 20.20, label=1)      # 00:50
TX3 = _record(3, 70, 30.30, label=None)   # 01:10, unlabelled
TX4 = _record(4, 20, 5.00, user='u00002') # 00:20
# tx1 and tx2 share their windows but not their batch: partials merge.
BATCHES = _batches([TX1, TX4], [TX2], [TX3])


def _row(user, start, end, count, total, is_fraud_rate):
  return {'user_id': user, 'window_start': start, 'window_end': end,
          'count': count, 'total_amount': total,
          'mean_amount': total / count, 'is_fraud_rate': is_fraud_rate}


def rows_equal(expected, key_field='user_id'):
  """A matcher of aggregate RecordBatches: their rows (as dicts, exactly)
  are `expected`, in any order, and every batch has the aggregate schema."""
  schema = DATASET.aggregate_schema(key_field)
  order = lambda row: (row[key_field], row['window_start'])

  def match(batches):
    for batch in batches:
      if batch.schema != schema:
        raise BeamAssertException(f'schema {batch.schema} != {schema}')
    actual = sorted((row for b in batches for row in b.to_pylist()),
                    key=order)
    if actual != sorted(expected, key=order):
      raise BeamAssertException(
          f'rows differ:\n actual   {actual}\n expected {expected}')
  return match


def test_fixed_hourly_windows():
  with TestPipeline() as p:
    rows = (p | beam.Create(BATCHES)
            | EntityAggregates(DATASET, 'user_id', size=3600))
    # u00001: 00:00-01:00 holds tx1 and tx2 (one of two labelled is fraud);
    # 01:00-02:00 holds tx3, which has no label. 10.10 + 20.20 is 30.30
    # exactly: summed as 1010 + 2020 cents.
    assert_that(rows, rows_equal([
        _row('u00001', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z', 2,
             30.30, 0.5),
        _row('u00001', '2026-10-01T01:00:00Z', '2026-10-01T02:00:00Z', 1,
             30.30, None),
        _row('u00002', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z', 1,
             5.00, 0.0),
    ]))


def test_sliding_windows_count_each_record_in_every_window_it_falls_in():
  with TestPipeline() as p:
    rows = (p | beam.Create(_batches([TX1], [TX2, TX3]))
            | EntityAggregates(DATASET, 'user_id', size=3600, period=1800))
    # Windows of 1 h every 30 min: [-00:30,00:30) tx1; [00:00,01:00) tx1,tx2;
    # [00:30,01:30) tx2,tx3; [01:00,02:00) tx3.
    assert_that(rows, rows_equal([
        _row('u00001', '2026-09-30T23:30:00Z', '2026-10-01T00:30:00Z', 1,
             10.10, 0.0),
        _row('u00001', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z', 2,
             30.30, 0.5),
        _row('u00001', '2026-10-01T00:30:00Z', '2026-10-01T01:30:00Z', 2,
             50.50, 1.0),
        _row('u00001', '2026-10-01T01:00:00Z', '2026-10-01T02:00:00Z', 1,
             30.30, None),
    ]))


def test_windows_before_1970_start_at_the_earlier_boundary():
  before, after = _record(5, 0, 1.00), _record(6, 0, 2.00)
  before['event_time'] = -60 * 1_000_000     # 1969-12-31T23:59:00Z
  after['event_time'] = 60 * 1_000_000       # 1970-01-01T00:01:00Z
  with TestPipeline() as p:
    rows = (p | beam.Create(_batches([before, after]))
            | EntityAggregates(DATASET, 'user_id', size=3600))
    # The hour of 23:59 is 23:00-00:00, not the hour that starts at 0.
    assert_that(rows, rows_equal([
        _row('u00001', '1969-12-31T23:00:00Z', '1970-01-01T00:00:00Z', 1,
             1.00, 0.0),
        _row('u00001', '1970-01-01T00:00:00Z', '1970-01-01T01:00:00Z', 1,
             2.00, 0.0),
    ]))


def test_per_merchant_key():
  with TestPipeline() as p:
    rows = (p | beam.Create(BATCHES)
            | EntityAggregates(DATASET, 'merchant_id', size=86400)
            | beam.FlatMap(lambda b: b.to_pylist())
            | beam.Map(lambda r: (r['merchant_id'], r['count'],
                                  r['total_amount'])))
    # One day holds all four records: 1010 + 2020 + 3030 + 500 cents.
    assert_that(rows, equal_to([('m00001', 4, 65.60)]))


# Batched aggregates == per-record Beam windowing -----------------------------
class _PerRecordSums(beam.CombineFn):
  """(amount, label) -> (count, cents, labelled, positives), one by one."""

  def create_accumulator(self):
    return (0, 0, 0, 0)

  def add_input(self, acc, element):
    amount, label = element
    return (acc[0] + 1, acc[1] + round(amount * 100),
            acc[2] + (label is not None), acc[3] + (label == 1))

  def merge_accumulators(self, accumulators):
    return tuple(map(sum, zip(*accumulators)))

  def extract_output(self, acc):
    return acc


def _reference_row(element, w=beam.DoFn.WindowParam):
  key, (count, cents, labelled, positives) = element
  total = cents / 100
  yield {'user_id': key, 'window_start': micros_to_rfc3339(w.start.micros),
         'window_end': micros_to_rfc3339(w.end.micros), 'count': count,
         'total_amount': total, 'mean_amount': total / count,
         'is_fraud_rate': positives / labelled if labelled else None}


def _per_record_reference(batches, windowfn):
  """What EntityAggregates computed before it batched: one element per
  record through Beam's windowing."""
  return (batches
          | 'ToRecords' >> beam.FlatMap(lambda b: b.to_pylist())
          | 'StampEventTime' >> beam.Map(lambda r: window.TimestampedValue(
              r, Timestamp(micros=r['event_time'])))
          | 'WindowPerRecord' >> beam.WindowInto(windowfn)
          | 'KeyAndValue' >> beam.Map(
              lambda r: (r['user_id'], (r['amount'], r['is_fraud'])))
          | 'SumPerRecord' >> beam.CombinePerKey(_PerRecordSums())
          | 'ReferenceRows' >> beam.ParDo(_reference_row)
          | 'ReferenceToGlobalWindow' >> beam.WindowInto(
              window.GlobalWindows()))


def _random_batches(n_records=3000, n_users=120, batch_size=250, seed=7):
  """Two days of records in shuffled batches (each batch spans many
  windows): some on window boundaries, some half-cent amounts (rounded half
  to even), negative amounts (refunds), labels 0, 1 or missing."""
  rng = random.Random(seed)
  records = []
  for i in range(n_records):
    if rng.random() < 0.1:
      minute = rng.randrange(0, 48 * 60, 30)         # on a boundary
    else:
      minute = rng.randrange(48 * 60 * MIN) / MIN    # any microsecond
    cents = rng.randrange(-500_000, 2_500_000)
    amount = (cents + 0.5) / 100 if rng.random() < 0.2 else cents / 100
    records.append(_record(
        i, minute, amount, user=f'u{rng.randrange(n_users):05d}',
        label=rng.choice([0, 1, None])))
  rng.shuffle(records)
  groups = [records[i:i + batch_size]
            for i in range(0, n_records, batch_size)]
  return _batches(*groups, [])


@pytest.mark.parametrize('size, period', [
    (3600, None),    # fixed
    (7200, 1800),    # sliding, size a multiple of the period
    (5400, 3600),    # sliding, 1.5 periods: slots of gcd = 30 min
])
def test_batched_aggregates_equal_per_record_windowing(size, period):
  batches = _random_batches()
  windowfn = (window.FixedWindows(size) if period is None
              else window.SlidingWindows(size, period))
  row_key = lambda row: (row['user_id'], row['window_start'])

  def same_rows(tagged):
    got = [row for tag, row in tagged if tag == 'batched']
    want = [row for tag, row in tagged if tag == 'reference']
    if not want or len(got) != len(want):
      raise BeamAssertException(f'{len(got)} rows, expected {len(want)}')
    got, want = sorted(got, key=row_key), sorted(want, key=row_key)
    wrong = [(g, w) for g, w in zip(got, want) if g != w]
    if wrong:
      raise BeamAssertException(f'{len(wrong)} rows differ, e.g. {wrong[:3]}')

  with TestPipeline() as p:
    records = p | beam.Create(batches)
    batched = (records
               | EntityAggregates(DATASET, 'user_id', size, period)
               | 'BatchedRows' >> beam.FlatMap(lambda b: b.to_pylist())
               | 'TagBatched' >> beam.Map(lambda row: ('batched', row)))
    reference = (_per_record_reference(records, windowfn)
                 | 'TagReference' >> beam.Map(lambda row: ('reference', row)))
    assert_that((batched, reference) | beam.Flatten(), same_rows)


def test_sum_partials_stays_bounded_and_sums_per_key():
  schema = partial_schema(DATASET, 'user_id')
  combine = SumPartials(schema)

  def partial(i):
    # Partial i: key u0000{i % 3}, count 1, i cents, labelled, positive if odd.
    return pa.RecordBatch.from_pylist(
        [{'user_id': f'u0000{i % 3}', 'count': 1, 'sum_amount': i,
          'labelled': 1, 'positives': i % 2}], schema=schema)

  acc = combine.create_accumulator()
  for i in range(300):
    acc = combine.add_input(acc, partial(i))
    assert len(acc) < COMPACT_AT
  other = combine.create_accumulator()
  for i in range(300, 303):
    other = combine.add_input(other, partial(i))
  merged = combine.merge_accumulators([acc, other])
  assert len(combine.compact(merged)) == 1
  # 303 partials, i = 0..302: key k holds the i with i % 3 == k, 101 each;
  # cents are their sums, positives their odd ones.
  expected = [
      {'user_id': f'u0000{k}', 'count': 101,
       'sum_amount': sum(range(k, 303, 3)), 'labelled': 101,
       'positives': sum(i % 2 for i in range(k, 303, 3))} for k in range(3)]
  assert combine.extract_output(merged).to_pylist() == expected
  assert combine.extract_output(combine.create_accumulator()).num_rows == 0


# Streaming form --------------------------------------------------------------
def _streaming():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


def _at(records):
  """A streaming batch, stamped with its earliest event time."""
  return window.TimestampedValue(
      pa.RecordBatch.from_pylist(records, schema=SCHEMA),
      Timestamp(micros=min(r['event_time'] for r in records)))


def _rows(batches, label):
  return batches | label >> beam.FlatMap(lambda b: b.to_pylist())


def test_streaming_rows_are_batch_rows_plus_pane_and_late_events_dead_letter():
  late = _record(5, 5, 1.00)     # 00:05, after the watermark passed 01:00
  stream = (TestStream(coder=beam.coders.PickleCoder())
            .add_elements([_at([TX1, TX2, TX3, TX4])])
            .advance_watermark_to(Timestamp(micros=T0 + 65 * 60 * 1_000_000))
            .add_elements([_at([late])])
            .advance_watermark_to_infinity())
  with _streaming() as p:
    out = p | stream | StreamingEntityAggregates(
        DATASET, 'user_id', size=3600, allowed_lateness=0)
    # The rows of test_fixed_hourly_windows, each in one on-time pane; the
    # late event is in none of them.
    on_time = {'pane': 'ON_TIME', 'pane_index': 0}
    assert_that(_rows(out[AGGREGATES], 'AggregateRows'), equal_to([
        dict(_row('u00001', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z',
                  2, 30.30, 0.5), **on_time),
        dict(_row('u00001', '2026-10-01T01:00:00Z', '2026-10-01T02:00:00Z',
                  1, 30.30, None), **on_time),
        dict(_row('u00002', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z',
                  1, 5.00, 0.0), **on_time),
    ]), label='aggregates')
    assert_that(_rows(out[LATE], 'LateRows') | beam.Map(lambda row: dict(
        row, raw=json.loads(row['raw']))), equal_to([{
            'source_file': None, 'position': None, 'error_kind': 'late',
            'field': 'user_id',
            'message': 'user_id u00001: event at 2026-10-01T00:05:00Z is '
                       'late: its first window ended 2026-10-01T01:00:00Z, '
                       '+ allowed lateness 0s = 2026-10-01T01:00:00Z, not '
                       'after the watermark 2026-10-01T01:00:00Z',
            'raw': dict(late, event_time='2026-10-01T00:05:00Z')}]),
                label='late')


def test_first_window_end_is_that_of_the_earliest_window_holding_t():
  # Worked by hand: hourly windows every 20 min hold 00:50 from the one
  # starting 00:00 (23:40's ends at 00:40, before it): first end 01:00;
  # 01:00 from 00:20's (00:00's ends at 01:00, excluded): 01:20; 23:59:59.99
  # from 23:00's: 00:00. Fixed hourly windows: the window of the hour.
  t = np.array([T0 + 50 * MIN, T0 + 60 * MIN, T0 - 1])
  assert first_window_end(t, 3600, 1200).tolist() == [
      T0 + 60 * MIN, T0 + 80 * MIN, T0]
  assert first_window_end(t, 3600, 3600).tolist() == [
      T0 + 60 * MIN, T0 + 120 * MIN, T0]
  # A size that is no multiple of the period: hourly windows every 25 min
  # (starts at 00:00, 00:25, 00:50 of the epoch) hold 00:50 from 00:00 on.
  assert first_window_end(np.array([50 * MIN]), 3600, 1500).tolist() == [
      60 * MIN]


def test_a_pane_of_no_records_is_not_a_row():
  # Flink emits such on-time panes (Beam's Python SDK asks for on-time
  # panes even when empty); a pane with records is a row per key.
  to_rows = _ToPaneRows(DATASET, 'user_id')
  schema = partial_schema(DATASET, 'user_id')
  w = window.IntervalWindow(Timestamp(micros=T0),
                            Timestamp(micros=T0 + 3600 * 1_000_000))
  pane = PaneInfo(True, True, PaneInfoTiming.ON_TIME, 0, 0)
  empty = schema.empty_table().to_batches() or [pa.RecordBatch.from_pylist(
      [], schema=schema)]
  assert list(to_rows.process((0, empty[0]), w=w, pane=pane)) == []
  one = pa.RecordBatch.from_pylist([{
      'user_id': 'u00001', 'count': 1, 'sum_amount': 1250, 'labelled': 1,
      'positives': 0}], schema=schema)
  [rows] = to_rows.process((0, one), w=w, pane=pane)
  [row] = rows.to_pylist()
  assert (row['count'], row['total_amount'], row['pane']) == (
      1, 12.5, 'ON_TIME')
