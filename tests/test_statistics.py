"""Tests of transforms.statistics: TFDV statistics of the feature table."""

import random

import pipelines.base.quiet  # noqa: F401  (before TensorFlow)
import apache_beam as beam
import pyarrow as pa
import pytest
import tensorflow_data_validation as tfdv
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.dataset import load_dataset
from transforms.statistics import (GenerateFeatureStatistics, WriteStatistics,
                                   read_statistics)

DATASET = load_dataset()
TYPES = DATASET.feature_types()
SCHEMA = DATASET.batch_schema(TYPES)
CATEGORIES = DATASET.fields['merchant_category'].allowed
COUNTRIES = DATASET.fields['country'].domain
T0 = 1_700_000_000_000_000   # epoch microseconds


# Feature rows -----------------------------------------------------------------
def feature_row(**values):
  """One row with every key of dataset.feature_types(); `values` override."""
  row = {}
  for name, ftype in TYPES.items():
    row[name] = {'string': 'x', 'float': 1.0, 'int': 1,
                 'timestamp': T0}[ftype]
  row.update(transaction_id='tx000000001', user_id='u00001',
             merchant_id='m00001', merchant_category='grocery', amount=10.0,
             currency='USD', channel='pos', country='US', is_fraud=0,
             event_hour=0)
  row.update(values)
  assert set(row) == set(TYPES), set(row) ^ set(TYPES)
  return row


def feature_rows(n, seed=0, amount_scale=1.0, edits=None):
  """`n` random valid rows; amounts are log-normal times `amount_scale`.

  edits: {row index: {field: value}} applied after generation.
  """
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    amount = round(rng.lognormvariate(3.5, 1.0) * amount_scale, 2)
    count_24h = rng.randrange(12)
    rows.append(feature_row(
        transaction_id=f'tx{seed:03d}{i:06d}',
        user_id=f'u{rng.randrange(300):05d}',
        merchant_id=f'm{rng.randrange(100):05d}',
        merchant_category=rng.choice(CATEGORIES), amount=amount,
        currency=rng.choice(('USD', 'EUR', 'GBP')),
        channel=rng.choice(('pos', 'online', 'atm')),
        country=rng.choice(COUNTRIES), event_time=T0 + i * 60_000_000,
        is_fraud=int(rng.random() < 0.05),
        user_id_count_1h=min(count_24h, rng.randrange(3)),
        user_id_count_24h=count_24h, user_id_count_7d=count_24h * 3,
        user_id_sum_24h=amount * count_24h,
        user_id_amount_to_mean_7d=rng.lognormvariate(0.0, 0.5),
        user_id_seconds_since_previous=rng.uniform(0, 604800),
        user_id_is_new_country_7d=int(rng.random() < 0.1),
        event_hour=(i // 60) % 24))
  for i, values in (edits or {}).items():
    rows[i].update(values)
  return rows


def to_batches(rows, rows_per_batch=1000):
  """Rows -> RecordBatches of the pipeline's feature schema (flat columns,
  None as null), `rows_per_batch` rows each."""
  return [pa.RecordBatch.from_pylist(rows[i:i + rows_per_batch],
                                     schema=SCHEMA)
          for i in range(0, len(rows), rows_per_batch)]


def compute_stats(tables, tmp_path, batch_size=10000):
  """{name: batches or feature_rows kwargs} -> {name: stats}, in one
  pipeline.

  Tables given as feature_rows kwargs are generated inside the pipeline:
  beam.Create pickles and compresses its elements into the pipeline, which
  costs seconds for a few thousand rows.
  """
  paths = {name: str(tmp_path / f'{name}.stats.pb') for name in tables}
  with TestPipeline() as p:
    for name, table in tables.items():
      if isinstance(table, dict):
        batches = (p
                   | f'Spec{name}' >> beam.Create([table])
                   | f'Generate{name}' >> beam.FlatMap(
                       lambda spec: to_batches(feature_rows(**spec))))
      else:
        batches = p | f'Create{name}' >> beam.Create(table, reshuffle=False)
      _ = (batches
           | f'Stats{name}' >> GenerateFeatureStatistics(
               DATASET, batch_size=batch_size)
           | f'Write{name}' >> WriteStatistics(paths[name]))
  return {name: read_statistics(path) for name, path in paths.items()}


def feature_stats(stats, name):
  return next(f for f in stats.datasets[0].features
              if f.path.step == [name])


# Tests ------------------------------------------------------------------------
HAND_MADE = [
    feature_row(transaction_id='tx000000001', amount=10.0, country='US',
                is_fraud=0),
    feature_row(transaction_id='tx000000002', amount=25.5, country='US',
                is_fraud=1),
    feature_row(transaction_id='tx000000003', amount=-4.5, channel='refund',
                country='GB', is_fraud=None),
    feature_row(transaction_id='tx000000004', amount=100.0, country='DE',
                is_fraud=0),
]


def test_stats_of_a_hand_made_table(tmp_path):
  path = str(tmp_path / 'stats.pb')

  def summary(stats_list):
    dataset = stats_list.datasets[0]
    amount = next(f for f in dataset.features if f.path.step == ['amount'])
    return (dataset.num_examples, len(dataset.features),
            round(amount.num_stats.min, 4), round(amount.num_stats.max, 4))

  with TestPipeline() as p:
    # Two batches, one as a Table: statistics combine across elements.
    stats = (p
             | beam.Create([pa.RecordBatch.from_pylist(HAND_MADE[:3],
                                                       schema=SCHEMA),
                            pa.Table.from_pylist(HAND_MADE[3:],
                                                 schema=SCHEMA)],
                           reshuffle=False)
             | GenerateFeatureStatistics(DATASET))
    _ = stats | WriteStatistics(path)
    assert_that(stats | beam.Map(summary),
                equal_to([(4, len(TYPES), -4.5, 100.0)]))

  stats = tfdv.load_stats_binary(path)   # the file is one binary proto
  assert stats == read_statistics(path)
  assert stats.datasets[0].num_examples == 4
  amount = feature_stats(stats, 'amount').num_stats
  assert amount.mean == pytest.approx((10.0 + 25.5 - 4.5 + 100.0) / 4)
  assert amount.min == pytest.approx(-4.5)
  assert amount.max == pytest.approx(100.0)
  assert amount.common_stats.num_non_missing == 4
  # A None label is a missing value, not a present-but-empty one.
  label = feature_stats(stats, 'is_fraud').num_stats
  assert label.common_stats.num_missing == 1
  assert label.common_stats.num_non_missing == 3
  assert label.mean == pytest.approx(1 / 3)
  country = feature_stats(stats, 'country').string_stats
  assert country.unique == 3
  assert [(v.value, v.frequency) for v in country.top_values][0] == (
      'US', 2.0)
  assert feature_stats(stats, 'event_time').num_stats.min == T0


def test_statistics_are_deterministic(tmp_path):
  spec = {'n': 5000, 'seed': 3}
  first = compute_stats({'a': spec}, tmp_path / 'first')['a']
  second = compute_stats({'a': spec}, tmp_path / 'second')['a']
  assert first.datasets[0].num_examples == 5000
  assert first == second
  # Quantiles, histograms and top values are all there, so also in reports.
  amount = feature_stats(first, 'amount').num_stats
  assert {h.type for h in amount.histograms} == {0, 1}  # STANDARD, QUANTILES
  assert len(feature_stats(first, 'country').string_stats.top_values) == len(
      COUNTRIES)


def test_statistics_do_not_depend_on_batching(tmp_path):
  """One 300-row batch, or 300 rows cut into 7-row TFXIO batches from
  13-row input batches, give the same statistics."""
  rows = feature_rows(300, seed=5, edits={7: {'is_fraud': None},
                                          8: {'merchant_id': None}})
  stats = compute_stats({'one': to_batches(rows, 300)}, tmp_path / 'one')
  small = compute_stats({'small': to_batches(rows, 13)}, tmp_path / 'small',
                        batch_size=7)
  assert stats['one'] == small['small']
  assert stats['one'].datasets[0].num_examples == 300
  merchant = feature_stats(stats['one'], 'merchant_id').string_stats
  assert merchant.common_stats.num_missing == 1
