"""Point-in-time history features against a brute-force reference and
against the record-at-a-time implementation they replaced."""

import collections
import dataclasses
import datetime
import math

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings, strategies as st

from schemas.dataset import load_dataset
from transforms.history_features import (HistoryFeatures, history_features,
                                history_table)

DATASET = load_dataset()
HOUR = 3600 * 1_000_000
T0 = 1_790_000_000 * 1_000_000  # a fixed instant (13 min 20 s past an hour)


def _record(i, t, amount, merchant='m00001', country='US', user='u00001'):
  return {'transaction_id': f'tx{i:09d}', 'user_id': user,
          'merchant_id': merchant, 'merchant_category': 'grocery',
          'amount': amount, 'currency': 'USD', 'channel': 'pos',
          'country': country, 'event_time': t, 'is_fraud': 0}


def _brute_force(records, dataset):
  """Recomputes every feature from scratch with the definition in the doc."""
  h, e = dataset.history, dataset.entity_field
  out = []
  for r in records:
    t = r['event_time']
    seen = {}
    for w, seconds in h.windows.items():
      seen[w] = [o for o in records
                 if t - seconds * 1_000_000 <= o['event_time'] < t]
    f = {}
    for w in h.windows:
      amounts = [o['amount'] for o in seen[w]]
      total = sum(round(a * 100) for a in amounts) / 100
      f[f'{e}_count_{w}'] = len(amounts)
      f[f'{e}_sum_{w}'] = total
      f[f'{e}_mean_{w}'] = total / len(amounts) if amounts else 0.0
      f[f'{e}_max_{w}'] = max(amounts) if amounts else 0.0
    for field, ws in h.distinct.items():
      for w in ws:
        f[f'{e}_distinct_{field}_{w}'] = len({o[field] for o in seen[w]})
    for field, w in h.novelty.items():
      f[f'{e}_is_new_{field}_{w}'] = int(
          r[field] not in {o[field] for o in seen[w]})
    mean = f[f'{e}_mean_{h.ratio_to_mean}']
    f[f'{e}_amount_to_mean_{h.ratio_to_mean}'] = (
        r['amount'] / mean if mean > 0 else 1.0)
    longest = seen[max(h.windows, key=h.windows.get)]
    f[f'{e}_seconds_since_previous'] = (
        (t - max(o['event_time'] for o in longest)) / 1_000_000
        if longest else float(h.horizon))
    f['event_hour'] = datetime.datetime.fromtimestamp(
        t // 1_000_000, datetime.timezone.utc).hour
    out.append(f)
  return out


# The record-at-a-time implementation that history_table replaced, kept as
# the reference its results must equal bit for bit (one entity per call).
def _window_names(dataset):
  """Feature names per window, built once (the declaration drives them)."""
  e, h = dataset.entity_field, dataset.history
  return {
      w: {agg: f'{e}_{agg}_{w}' for agg in h.aggregates}
      for w in h.windows
  }


class _Window:
  """Records of one entity with t - w <= t_j < t, maintained incrementally."""

  def __init__(self, seconds, tracked):
    self.length = seconds * 1_000_000
    self.lo = 0
    self.hi = 0
    self.max_deque = collections.deque()   # indices, values decreasing
    self.counts = {f: collections.Counter() for f in tracked}

  def advance(self, records, times, values, t):
    while self.hi < len(records) and times[self.hi] < t:
      v = values[self.hi]
      while self.max_deque and values[self.max_deque[-1]] <= v:
        self.max_deque.pop()
      self.max_deque.append(self.hi)
      for f, counter in self.counts.items():
        counter[records[self.hi][f]] += 1
      self.hi += 1
    while self.lo < self.hi and times[self.lo] < t - self.length:
      if self.max_deque and self.max_deque[0] == self.lo:
        self.max_deque.popleft()
      for f, counter in self.counts.items():
        key = records[self.lo][f]
        counter[key] -= 1
        if not counter[key]:
          del counter[key]
      self.lo += 1


def _reference_history_features(records, dataset):
  """Feature dicts for one entity's records, in the order of `records`.

  `records` may come in any order; each result only uses records strictly
  earlier in event time, within each declared window.
  """
  h = dataset.history
  ts, vf, e = dataset.timestamp_field, h.value, dataset.entity_field
  cents = dataset.fields[vf].cents
  order = sorted(range(len(records)),
                 key=lambda i: (records[i][ts], records[i][dataset.id_field]))
  ordered = [records[i] for i in order]
  times = [r[ts] for r in ordered]
  values = [r[vf] for r in ordered]
  prefix = [0]
  if cents:
    for v in values:
      prefix.append(prefix[-1] + round(v * 100))

  tracked = {w: set() for w in h.windows}
  for field, windows in h.distinct.items():
    for w in windows:
      tracked[w].add(field)
  for field, w in h.novelty.items():
    tracked[w].add(field)
  windows = {w: _Window(s, sorted(tracked[w])) for w, s in h.windows.items()}
  names = _window_names(dataset)
  longest = max(h.windows, key=h.windows.get)
  ratio_name = f'{e}_{vf}_to_mean_{h.ratio_to_mean}'

  out = [None] * len(records)
  for k, record in enumerate(ordered):
    t = times[k]
    features = {}
    means = {}
    for w, window in windows.items():
      window.advance(ordered, times, values, t)
      n = window.hi - window.lo
      if cents:
        total = (prefix[window.hi] - prefix[window.lo]) / 100
      else:
        total = math.fsum(values[window.lo:window.hi])
      means[w] = total / n if n else 0.0
      agg = {'count': n, 'sum': total, 'mean': means[w],
             'max': values[window.max_deque[0]] if n else 0.0}
      for name_of, name in names[w].items():
        features[name] = agg[name_of]
    for field, ws in h.distinct.items():
      for w in ws:
        features[f'{e}_distinct_{field}_{w}'] = len(windows[w].counts[field])
    for field, w in h.novelty.items():
      features[f'{e}_is_new_{field}_{w}'] = int(
          record[field] not in windows[w].counts[field])
    if h.ratio_to_mean:
      mean = means[h.ratio_to_mean]
      features[ratio_name] = record[vf] / mean if mean > 0 else 1.0
    if h.seconds_since_previous:
      window = windows[longest]
      features[f'{e}_seconds_since_previous'] = (
          (t - times[window.hi - 1]) / 1_000_000 if window.hi > window.lo
          else float(h.horizon))
    if 'hour' in h.calendar:
      features['event_hour'] = datetime.datetime.fromtimestamp(
          t // 1_000_000, datetime.timezone.utc).hour
    out[order[k]] = features
  return out


def test_first_transaction_has_empty_history():
  [f] = history_features([_record(1, T0, 20.0)], DATASET)
  assert f['user_id_count_7d'] == 0
  assert f['user_id_sum_24h'] == 0.0
  assert f['user_id_is_new_country_7d'] == 1
  assert f['user_id_amount_to_mean_7d'] == 1.0
  assert f['user_id_seconds_since_previous'] == 7 * 24 * 3600


def test_ties_do_not_see_each_other_and_boundaries_are_inclusive():
  records = [
      _record(1, T0, 10.0),                 # exactly 1 h before the ties
      _record(2, T0 + HOUR, 30.0),          # tie
      _record(3, T0 + HOUR, 50.0, country='FR'),  # tie
      _record(4, T0 + HOUR + 1, 5.0),       # 1 us after the ties
  ]
  f = history_features(records, DATASET)
  # Records 2 and 3 see only record 1 (t - 1h <= t1 < t), not each other.
  assert [f[1]['user_id_count_1h'], f[2]['user_id_count_1h']] == [1, 1]
  assert f[1]['user_id_sum_1h'] == 10.0
  assert f[2]['user_id_is_new_country_7d'] == 1
  # Record 4: record 1 is now 1 h + 1 us old, out of the 1 h window.
  assert f[3]['user_id_count_1h'] == 2
  assert f[3]['user_id_sum_1h'] == 80.0
  assert f[3]['user_id_max_1h'] == 50.0
  assert f[3]['user_id_count_24h'] == 3
  assert f[3]['user_id_distinct_country_24h'] == 2
  assert f[3]['user_id_seconds_since_previous'] == 1e-6
  # 7-day mean before record 4 is (10 + 30 + 50) / 3 = 30.
  assert f[3]['user_id_amount_to_mean_7d'] == pytest.approx(5.0 / 30.0)


_amounts = st.sampled_from([0.01, 1.5, 9.99, 20.0, 120.35, 999.99, 15000.0])
_history = st.lists(
    st.tuples(st.integers(0, 10 * 24 * 3600), _amounts,
              st.sampled_from(['m00001', 'm00002', 'm00003']),
              st.sampled_from(['US', 'GB', 'FR'])),
    min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(_history, st.sampled_from([1, 60, 3600, 86400]))
def test_matches_brute_force(events, granularity):
  # Coarse granularities make ties and exact window boundaries common.
  records = [_record(i, T0 + (s // granularity) * granularity * 1_000_000,
                     a, m, c)
             for i, (s, a, m, c) in enumerate(events)]
  assert history_features(records, DATASET) == _brute_force(records, DATASET)


def test_input_order_does_not_matter():
  records = [_record(i, T0 + i * 600 * 1_000_000, 10.0 + i) for i in range(30)]
  forward = history_features(records, DATASET)
  backward = history_features(records[::-1], DATASET)
  assert forward == backward[::-1]


def _batch(records):
  return pa.RecordBatch.from_pylist(records, schema=DATASET.batch_schema())


def _rows_equal_to(expected, columns):
  """A matcher of RecordBatches: their rows, as tuples of `columns`, equal
  `expected` (in any order)."""
  check = equal_to(expected)

  def match(batches):
    check([tuple(row[c] for c in columns)
           for batch in batches for row in batch.to_pylist()])
  return match


def test_history_transform_keeps_entities_apart():
  records = [_record(1, T0, 10.0, user='u00001'),
             _record(2, T0 + HOUR // 2, 20.0, user='u00002'),
             _record(3, T0 + HOUR // 2, 40.0, user='u00001')]
  with TestPipeline() as p:
    # One shard: the users meet in one table, which must keep them apart.
    batches = (p | beam.Create([_batch(records[:2]), _batch(records[2:])])
               | HistoryFeatures(DATASET, num_shards=1))
    # tx3 sees tx1 (same user, 30 min earlier); tx2 is another user's first.
    assert_that(batches, _rows_equal_to(
        [('tx000000001', 0, 0.0), ('tx000000002', 0, 0.0),
         ('tx000000003', 1, 10.0)],
        ['transaction_id', 'user_id_count_1h', 'user_id_sum_1h']))


# Vectorised against the record-at-a-time reference ------------------------
def _reference_rows(records, dataset):
  """transaction_id -> reference features, computed entity by entity."""
  by_entity = collections.defaultdict(list)
  for r in records:
    by_entity[r[dataset.entity_field]].append(r)
  out = {}
  for mine in by_entity.values():
    for r, f in zip(mine, _reference_history_features(mine, dataset)):
      out[r['transaction_id']] = f
  return out


def _bits(features):
  """Features with floats as their exact bits (float.hex tells 0.0 from
  -0.0 and every last-place difference) and the Python type of each."""
  return {k: (type(v).__name__, v.hex() if isinstance(v, float) else v)
          for k, v in features.items()}


# x * 100 lands just below (0.29, 4.35, 19.99) or above (0.07) a whole
# number of cents for some; 0.1 + 0.2 is not 0.3 in floats.
_signed_amounts = st.sampled_from(
    [0.01, 0.07, 0.1, 0.2, 0.29, 0.3, 1.5, 4.35, 19.99, 20.0, 120.35,
     15000.0, -0.01, -0.57, -5.0, -120.35, -4999.99])
_multi_entity_history = st.lists(
    st.tuples(st.integers(0, 10 * 24 * 3600),
              st.sampled_from([0, 0, 0, 1, -1]),    # us off a boundary
              _signed_amounts,
              st.sampled_from(['u00001', 'u00002', 'u00003', 'u00004']),
              st.sampled_from(['m00001', 'm00002', 'm00003']),
              st.sampled_from(['US', 'GB', 'FR'])),
    min_size=0, max_size=60)
_WITHOUT_CENTS = dataclasses.replace(DATASET, fields=dict(
    DATASET.fields, amount=dataclasses.replace(DATASET.fields['amount'],
                                               cents=False)))


@settings(max_examples=200, deadline=None)
@given(_multi_entity_history, st.sampled_from([1, 60, 3600, 86400]),
       st.sampled_from([DATASET, _WITHOUT_CENTS]), st.randoms())
def test_vectorised_equals_the_record_at_a_time_reference(
    events, granularity, dataset, rng):
  # Coarse granularities make ties and exact window boundaries (t - w) common;
  # the +-1 us offsets put records just inside and just outside them.
  records = [_record(i, T0 + (s // granularity) * granularity * 1_000_000 + d,
                     a, m, c, user=u)
             for i, (s, d, a, u, m, c) in enumerate(events)]
  rng.shuffle(records)   # ids no longer follow the input order
  expected = _reference_rows(records, dataset)

  table = history_table(_batch(records), dataset)
  assert table.schema == dataset.batch_schema(dataset.feature_types())
  rows = table.to_pylist()
  assert sorted(r['transaction_id'] for r in rows) == sorted(expected)
  keys = [(r['user_id'], r['event_time'], r['transaction_id']) for r in rows]
  assert keys == sorted(keys)
  names = list(dataset.history_feature_types())
  for row in rows:
    got = {n: row[n] for n in names}
    assert _bits(got) == _bits(expected[row['transaction_id']])
    assert {k: row[k] for k in DATASET.fields} == next(
        r for r in records if r['transaction_id'] == row['transaction_id'])

  features = history_features(records, dataset)
  assert [_bits(f) for f in features] == [
      _bits(expected[r['transaction_id']]) for r in records]


def test_times_over_millennia_give_the_same_features():
  # 40 users x (year 1970 .. year 9000) microseconds overflows an int64
  # (entity, time) key; the key of dense time ranks takes over. Each user's
  # far-future record must not change the features of the others.
  near = [_record(i, T0 + (i % 7) * HOUR - (i % 3), 1.5 + i % 4,
                  country=['US', 'GB'][i % 2], user=f'u{i % 40:05d}')
          for i in range(200)]
  far_t = 250_000_000_000 * 1_000_000   # in the year 9892
  far = [_record(1000 + u, far_t + u % 2, 9.99, user=f'u{u:05d}')
         for u in range(40)]
  with_far = history_features(near + far, DATASET)
  assert with_far[:200] == history_features(near, DATASET)
  expected = _reference_rows(near + far, DATASET)
  assert [_bits(f) for f in with_far] == [
      _bits(expected[r['transaction_id']]) for r in near + far]


def test_event_hour_is_the_utc_hour():
  midnight = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z
  times = [midnight + h * HOUR for h in range(24)] + [
      midnight + h * HOUR - 1 for h in range(1, 25)] + [-1, 0]
  records = [_record(i, t, 1.0, user=f'u{i:05d}')
             for i, t in enumerate(times)]
  hours = [f['event_hour'] for f in history_features(records, DATASET)]
  # h:00:00 is hour h, 1 us earlier hour h - 1; 1969-12-31T23:59:59.999999Z
  # (-1 us) is hour 23, the epoch hour 0.
  assert hours == list(range(24)) + list(range(24)) + [23, 0]


def test_no_records_give_no_rows():
  assert history_features([], DATASET) == []
  table = history_table(DATASET.batch_schema().empty_table(), DATASET)
  assert table.num_rows == 0
  assert table.schema == DATASET.batch_schema(DATASET.feature_types())


def test_distinct_counts_long_windows_exactly():
  # 300 records of one user a minute apart cycling through 7 merchants: the
  # 24 h window holds up to 299 records, so the distinct count runs over
  # dyadic blocks of up to 256 rows. Worked out by hand: record k has k
  # earlier records, min(k, 7) distinct merchants, and its own merchant is
  # new exactly for the first 7.
  records = [_record(k, T0 + k * 60 * 1_000_000, 1.0,
                     merchant=f'm{k % 7:05d}') for k in range(300)]
  features = history_features(records, DATASET)
  assert [f['user_id_count_24h'] for f in features] == list(range(300))
  assert [f['user_id_distinct_merchant_id_24h'] for f in features] == [
      min(k, 7) for k in range(300)]
  assert [f['user_id_is_new_merchant_id_7d'] for f in features] == [
      int(k < 7) for k in range(300)]
  assert [f['user_id_max_1h'] for f in features] == [
      0.0] + [1.0] * 299


def test_ratio_to_mean_needs_a_positive_mean():
  records = [_record(1, T0, 0.01), _record(2, T0 + 1, 0.01),
             _record(3, T0 + 2, -0.01, country='FR'),   # a refund
             _record(4, T0 + 3, 1.0),
             _record(5, T0 + 4, -5.0), _record(6, T0 + 5, -5.0)]
  f = history_features(records, DATASET)
  ratio = [r['user_id_amount_to_mean_7d'] for r in f]
  # tx4: 7-day mean (1 + 1 - 1) cents / 3 = 0.01 / 3 > 0, a ratio of ~300.
  assert ratio[3] == 1.0 / (0.01 / 3)
  # tx6: mean (1 + 1 - 1 + 100 - 500) cents / 5 = -0.798 < 0: ratio 1.0.
  assert f[5]['user_id_mean_7d'] == -3.99 / 5
  assert ratio[5] == 1.0
  # tx1 has no history (ratio 1.0); tx2: 0.01 / 0.01; tx3: -0.01 / 0.01.
  assert ratio[:3] == [1.0, 1.0, -1.0]
