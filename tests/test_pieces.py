"""Grouped steps emit bounded elements: at most common.PIECE_ROWS rows each,
whatever a shard or window holds, and the same rows as one batch would.

On Flink every element crosses the TaskManager's heap whole, so an element
that grows with the input (one batch per shard) makes the heap a run needs
grow with it. Here PIECE_ROWS is lowered to a few rows so that small
inputs cross it many times over.
"""

import json
import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that

from schemas.dataset import load_dataset
from transforms import common
from transforms.aggregates import EntityAggregates
from transforms.common import DEAD_LETTER, VALID
from transforms.history_features import HistoryFeatures, history_table
from transforms.negatives import NegativeSampling, build_catalogue, negatives_table
from transforms.parse import ParseAndValidate
from transforms.read import ReadRecords

DATASET = load_dataset()
PIECE = 7
T0 = 1_790_812_800   # 2026-10-01T00:00:00Z, seconds


def _rows(batches):
  return sorted(tuple(sorted(row.items()))
                for batch in batches for row in batch.to_pylist())


def _pieces_of(expected_rows, what):
  """A matcher: every batch at most PIECE rows, and together exactly
  `expected_rows` (as `_rows` gives them)."""

  def match(batches):
    sizes = [b.num_rows for b in batches]
    if not sizes or max(sizes) > PIECE:
      raise BeamAssertException(f'{what}: batches of {sorted(sizes)[-3:]} '
                                f'rows, at most {PIECE} expected')
    actual = _rows(batches)
    if actual != expected_rows:
      raise BeamAssertException(f'{what}: {len(actual)} rows vs '
                                f'{len(expected_rows)} expected')
  return match


def _transactions(n=120, ids=90, users=5, seed=3):
  """n records over ids ids (so about a quarter are copies, some earlier
  in event time than the first read), a few users, over two days."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    t = T0 + rng.randrange(2 * 86400)
    out.append({
        'transaction_id': f'tx{i % ids:09d}', 'user_id': f'u{rng.randrange(users):05d}',
        'merchant_id': f'm{rng.randrange(4):05d}',
        'merchant_category': 'grocery', 'amount': rng.randrange(1, 9999) / 100,
        'currency': 'USD', 'channel': 'pos', 'country': 'US',
        'event_time': common.micros_to_rfc3339(t * common.MICROS),
        'is_fraud': rng.randrange(2)})
  return out


def test_dedupe_emits_pieces_with_the_first_copies(tmp_path, monkeypatch):
  records = _transactions()
  path = tmp_path / 'a.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  # Worked out by the rule: per id the earliest event time wins, then the
  # copy read first (its position in the file).
  winners = {}
  for position, r in enumerate(records):
    key = (r['event_time'], position)
    if r['transaction_id'] not in winners or key < winners[
        r['transaction_id']][0]:
      winners[r['transaction_id']] = (key, r)
  expected_amounts = sorted((i, w[1]['amount']) for i, w in winners.items())
  monkeypatch.setattr(common, 'PIECE_ROWS', PIECE, raising=False)

  def match(batches):
    _pieces_of(_rows(batches), 'valid')(batches)
    got = sorted((r['transaction_id'], r['amount'])
                 for b in batches for r in b.to_pylist())
    if got != expected_amounts:
      raise BeamAssertException(f'{len(got)} winners vs '
                                f'{len(expected_amounts)} expected')

  def dead(batches):
    n = sum(b.num_rows for b in batches)
    if n != len(records) - len(winners):
      raise BeamAssertException(f'{n} duplicates dead-lettered')

  with TestPipeline() as p:
    # One shard: all 90 winners meet in one group, 13 pieces of it.
    out = (p | ReadRecords(str(path), DATASET)
           | ParseAndValidate(DATASET, num_shards=1))
    assert_that(out[VALID], match, label='valid')
    assert_that(out[DEAD_LETTER], dead, label='dead')


def _valid_batches(records, size=25):
  schema = DATASET.batch_schema()
  rows = [dict(r, event_time=int(np.datetime64(r['event_time'][:-1], 'us')
                                 .astype(np.int64))) for r in records]
  rows = list({r['transaction_id']: r for r in rows}.values())
  return [pa.RecordBatch.from_pylist(rows[i:i + size], schema=schema)
          for i in range(0, len(rows), size)]


def test_history_emits_pieces_by_default(monkeypatch):
  inputs = _valid_batches(_transactions())
  expected = _rows(history_table(pa.Table.from_batches(inputs),
                                 DATASET).to_batches())
  monkeypatch.setattr(common, 'PIECE_ROWS', PIECE, raising=False)
  with TestPipeline() as p:
    features = (p | beam.Create(inputs)
                | HistoryFeatures(DATASET, num_shards=1))
    assert_that(features, _pieces_of(expected, 'history'))


def _daily_aggregates(records):
  """Aggregate rows per (user, day) worked out one record at a time, as
  `_reference_row` in test_aggregates does (sums in cents)."""
  sums = {}
  for r in records:
    day = int(np.datetime64(r['event_time'][:-1], 's').astype(np.int64))
    day -= day % 86400
    s = sums.setdefault((r['user_id'], day), [0, 0, 0, 0])
    s[0] += 1
    s[1] += round(r['amount'] * 100)
    s[2] += 1
    s[3] += r['is_fraud']
  rows = []
  for (user, day), (count, cents, labelled, positives) in sums.items():
    rows.append({'user_id': user,
                 'window_start': common.micros_to_rfc3339(day * common.MICROS),
                 'window_end': common.micros_to_rfc3339(
                     (day + 86400) * common.MICROS),
                 'count': count, 'total_amount': cents / 100,
                 'mean_amount': cents / 100 / count,
                 'is_fraud_rate': positives / labelled})
  return sorted(tuple(sorted(row.items())) for row in rows)


def test_aggregates_emit_pieces_of_a_window(monkeypatch):
  # 40 users over two daily windows: about 40 rows a window.
  records = _transactions(n=400, ids=400, users=40)
  expected = _daily_aggregates(records)
  assert len(expected) > 4 * PIECE
  monkeypatch.setattr(common, 'PIECE_ROWS', PIECE, raising=False)
  with TestPipeline() as p:
    rows = (p | beam.Create(_valid_batches(records))
            | EntityAggregates(DATASET, 'user_id', 86400))
    assert_that(rows, _pieces_of(expected, 'aggregates'))


def test_negatives_emit_pieces(monkeypatch):
  rng = np.random.default_rng(1)
  n = 300
  rows = pa.RecordBatch.from_pydict({
      'id': np.arange(n) + 1000, 'user': rng.integers(0, 4, n),
      'item': rng.integers(0, 50, n),
      'ts': rng.integers(0, 100, n) * 1_000_000,
      'label': (rng.random(n) < 0.5).astype(np.int64)})
  catalogue = pa.RecordBatch.from_pydict({'item': np.arange(50)})
  fields = dict(user_field='user', item_field='item', timestamp_field='ts',
                label_field='label')
  # The whole input as one shard, without Beam.
  whole, _ = negatives_table(
      pa.Table.from_batches([rows]),
      build_catalogue([catalogue], 'item', 'uniform', None),
      k=3, seed=5, id_field='id', **fields)
  expected = _rows([whole])
  assert len(expected) > 2 * PIECE
  monkeypatch.setattr(common, 'PIECE_ROWS', PIECE, raising=False)
  with TestPipeline() as p:
    negatives = ((p | 'Rows' >> beam.Create([rows]),
                  p | 'Catalogue' >> beam.Create([catalogue]))
                 | NegativeSampling(k=3, strategy='uniform', seed=5,
                                    num_shards=1, id_field='id', **fields))
    assert_that(negatives, _pieces_of(expected, 'negatives'))
