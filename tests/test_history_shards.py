"""Batch history features do not depend on how entities are sharded."""

import random

import apache_beam as beam
import pyarrow as pa
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that

from schemas.dataset import load_dataset
from transforms.history_features import HistoryFeatures, history_table

DATASET = load_dataset()
MIN = 60 * 1_000_000
T0 = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z
MAX_BATCH_ROWS = 50


def _records(n_events=600, n_users=40, seed=5):
  """Events over 10 days on a 10-minute grid (ties are common), some users
  with many events, a few refunds."""
  rng = random.Random(seed)
  records = []
  for i in range(n_events):
    refund = rng.random() < 0.05
    user = min(rng.randrange(n_users), rng.randrange(n_users))  # skewed
    records.append({
        'transaction_id': f'tx{i:09d}', 'user_id': f'u{user:05d}',
        'merchant_id': f'm{rng.randrange(6):05d}',
        'merchant_category': 'grocery',
        'amount': -rng.choice([5.0, 12.99]) if refund else rng.choice(
            [0.01, 1.5, 20.0, 99.99, 250.0, 1200.35]),
        'currency': 'USD', 'channel': 'refund' if refund else 'pos',
        'country': rng.choice(['US', 'GB', 'FR']),
        'event_time': T0 + rng.randrange(10 * 24 * 6) * 10 * MIN,
        'is_fraud': 0})
  return records


def _rows(batches):
  return sorted((tuple(sorted(row.items()))
                 for batch in batches for row in batch.to_pylist()),
                key=lambda row: dict(row)['transaction_id'])


def _equal_to_rows(expected, schema):
  """A matcher: the batches have `schema`, at most MAX_BATCH_ROWS rows each,
  and together exactly the rows of `expected` (floats compared with ==)."""

  def match(batches):
    for batch in batches:
      if batch.schema != schema or batch.num_rows > MAX_BATCH_ROWS:
        raise BeamAssertException(
            f'batch of {batch.num_rows} rows, schema {batch.schema}')
    actual = _rows(batches)
    if actual != expected:
      wrong = [a for a, e in zip(actual, expected) if a != e][:2]
      raise BeamAssertException(
          f'{len(actual)} rows vs {len(expected)} expected; first '
          f'differences: {wrong}')
  return match


def test_history_does_not_depend_on_the_shard_count():
  records = _records()
  schema = DATASET.batch_schema()
  # Whole-table features, checked against the reference in test_history.
  expected = _rows(history_table(
      pa.Table.from_pylist(records, schema=schema), DATASET).to_batches())
  # Input batches that cut across users, as a reader would deliver them.
  inputs = [pa.RecordBatch.from_pylist(records[i:i + 70], schema=schema)
            for i in range(0, len(records), 70)]
  with TestPipeline() as p:
    batches = p | beam.Create(inputs)
    for shards in (1, 3, 64):
      features = batches | f'History[{shards} shards]' >> HistoryFeatures(
          DATASET, num_shards=shards, max_batch_rows=MAX_BATCH_ROWS)
      assert_that(features, _equal_to_rows(
          expected, DATASET.batch_schema(DATASET.feature_types())),
                  label=f'Check[{shards} shards]')
