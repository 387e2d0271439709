"""Windowed entity aggregates, with hand-computed values per window."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.dataset import load_dataset
from transforms.aggregates import EntityAggregates

DATASET = load_dataset()
T0 = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z
MIN = 60 * 1_000_000


def _record(i, minute, amount, user='u00001', label=0):
  return {'transaction_id': f'tx{i:09d}', 'user_id': user,
          'merchant_id': 'm00001', 'amount': amount,
          'event_time': T0 + minute * MIN, 'is_fraud': label}


RECORDS = [
    _record(1, 10, 10.10),               # 00:10
    _record(2, 50, 20.20, label=1),      # 00:50
    _record(3, 70, 30.30, label=None),   # 01:10, unlabelled
    _record(4, 20, 5.00, user='u00002'), # 00:20
]


def _row(user, start, end, count, total, fraud_rate):
  return {'user_id': user, 'window_start': start, 'window_end': end,
          'count': count, 'total_amount': total,
          'mean_amount': pytest.approx(total / count),
          'fraud_rate': fraud_rate}


def test_fixed_hourly_windows():
  with TestPipeline() as p:
    rows = (p | beam.Create(RECORDS)
            | EntityAggregates(DATASET, 'user_id', size=3600))
    # u00001: 00:00-01:00 holds tx1 and tx2 (one of two labelled is fraud);
    # 01:00-02:00 holds tx3, which has no label.
    assert_that(rows, equal_to([
        _row('u00001', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z', 2,
             30.30, 0.5),
        _row('u00001', '2026-10-01T01:00:00Z', '2026-10-01T02:00:00Z', 1,
             30.30, None),
        _row('u00002', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z', 1,
             5.00, 0.0),
    ]))


def test_sliding_windows_count_each_record_in_every_window_it_falls_in():
  with TestPipeline() as p:
    rows = (p | beam.Create(RECORDS[:3])
            | EntityAggregates(DATASET, 'user_id', size=3600, period=1800))
    # Windows of 1 h every 30 min: [-00:30,00:30) tx1; [00:00,01:00) tx1,tx2;
    # [00:30,01:30) tx2,tx3; [01:00,02:00) tx3.
    assert_that(rows, equal_to([
        _row('u00001', '2026-09-30T23:30:00Z', '2026-10-01T00:30:00Z', 1,
             10.10, 0.0),
        _row('u00001', '2026-10-01T00:00:00Z', '2026-10-01T01:00:00Z', 2,
             30.30, 0.5),
        _row('u00001', '2026-10-01T00:30:00Z', '2026-10-01T01:30:00Z', 2,
             50.50, 1.0),
        _row('u00001', '2026-10-01T01:00:00Z', '2026-10-01T02:00:00Z', 1,
             30.30, None),
    ]))


def test_per_merchant_key():
  with TestPipeline() as p:
    rows = (p | beam.Create(RECORDS)
            | EntityAggregates(DATASET, 'merchant_id', size=86400)
            | beam.Map(lambda r: (r['merchant_id'], r['count'],
                                  r['total_amount'])))
    assert_that(rows, equal_to([('m00001', 4, 65.60)]))
