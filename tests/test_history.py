"""Point-in-time history features against a brute-force reference."""

import datetime

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings, strategies as st

from schemas.dataset import load_dataset
from transforms.history import HistoryFeatures, history_features

DATASET = load_dataset()
HOUR = 3600 * 1_000_000
T0 = 1_790_000_000 * 1_000_000  # a fixed instant, on an hour boundary


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


def test_history_transform_keeps_entities_apart():
  records = [_record(1, T0, 10.0, user='u00001'),
             _record(2, T0 + HOUR // 2, 20.0, user='u00002'),
             _record(3, T0 + HOUR // 2, 40.0, user='u00001')]
  with TestPipeline() as p:
    rows = (p | beam.Create(records) | HistoryFeatures(DATASET)
            | beam.Map(lambda r: (r['transaction_id'], r['user_id_count_1h'],
                                  r['user_id_sum_1h'])))
    # tx3 sees tx1 (same user, 30 min earlier); tx2 is another user's first.
    assert_that(rows, equal_to([('tx000000001', 0, 0.0),
                                ('tx000000002', 0, 0.0),
                                ('tx000000003', 1, 10.0)]))
