"""transforms.negatives: k unseen distinct negatives per positive, the
strategies' distributions, the short case, and the same rows on reruns and
for any shard count."""

import collections

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from transforms.negatives import (NEGATIVE_OF, NEGATIVE_RANK, NegativeSampling,
                                  build_catalogue, negatives_table,
                                  positive_key, sample_negatives)

FIELDS = dict(user_field='user', item_field='item', timestamp_field='ts',
              label_field='label')


ITEMS = 120


def _interactions(seed=0, users=40, items=ITEMS, rows=1500):
  """Random interactions: a few heavy users (the busiest sees about 70% of
  the items by the end, so rejection rounds reject often), many light
  ones; about a third positive; times with ties."""
  rng = np.random.default_rng(seed)
  activity = 1.0 / np.arange(1, users + 1) ** 0.8
  user = rng.choice(users, rows, p=activity / activity.sum())
  return pa.RecordBatch.from_pydict({
      'id': np.arange(rows) + 1000,
      'user': user.astype(np.int64),
      'item': rng.integers(0, items, rows),
      'ts': rng.integers(0, 200, rows) * 1_000_000,
      'label': (rng.random(rows) < 0.35).astype(np.int64),
      'extra': rng.random(rows),
  })


def _catalogue(items=ITEMS, weight=None):
  columns = {'item': np.arange(items)}
  if weight is not None:
    columns['weight'] = weight
  return pa.RecordBatch.from_pydict(columns)


def _rows(batches):
  """RecordBatches -> sorted row tuples (a set that ignores sharding)."""
  out = []
  for batch in batches:
    out.extend(zip(*(c.to_pylist() for c in batch.columns)))
  return sorted(out)


def _check_definition(rows: pa.RecordBatch, negatives, k, key='id'):
  """Brute force, one record at a time: every positive has exactly k
  distinct negatives, ranks 0..k-1, none seen by the user at or before the
  positive's time. Returns the number of positives."""
  first = {}
  for u, i, t in zip(*(rows.column(c).to_pylist() for c in
                       ('user', 'item', 'ts'))):
    first[(u, i)] = min(t, first.get((u, i), t))
  positives = {r[key]: r for r in rows.to_pylist() if r['label'] == 1}
  drawn = collections.defaultdict(list)
  for n in negatives:
    assert n['label'] == 0
    p = positives[n[NEGATIVE_OF]]
    assert (n['user'], n['ts']) == (p['user'], p['ts'])
    assert first.get((n['user'], n['item']), p['ts'] + 1) > p['ts'], n
    drawn[n[NEGATIVE_OF]].append((n[NEGATIVE_RANK], n['item']))
  assert set(drawn) == set(positives)
  for draws in drawn.values():
    assert sorted(r for r, _ in draws) == list(range(k))
    assert len({i for _, i in draws}) == k
  return len(positives)


# The NumPy sampler ---------------------------------------------------------
def _one_user_history(items_seen, t_seen, m):
  """User 0: a positive at t=100 on item 0, plus the given interactions."""
  users = np.zeros(len(items_seen) + 1, dtype=np.int64)
  items = np.array([0] + list(items_seen))
  times = np.array([100] + list(t_seen))
  positive = np.zeros(len(users), dtype=bool)
  positive[0] = True
  keys = np.arange(len(users), dtype=np.uint64)
  return users, items, times, positive, keys, np.ones(m)


def test_same_time_is_seen_and_later_is_not():
  # Catalogue 0..3. At t=100 the user has: item 0 (the positive itself),
  # item 1 at t=100 (same time: seen), item 2 at t=50 (seen), item 3 only
  # at t=150 (later: not seen). So item 3 is the one possible negative.
  args = _one_user_history([1, 2, 3], [100, 50, 150], 4)
  draws = sample_negatives(*args, k=1, seed=3)
  assert draws.item.tolist() == [3]
  assert draws.positive_row.tolist() == [0]
  assert draws.short == 0


def test_short_positive_gets_every_unseen_item_and_counts_the_rest():
  # 10 items, 7 seen before t (0 is the positive's): 3 unseen, k=5.
  args = _one_user_history(range(1, 7), [10] * 6, 10)
  draws = sample_negatives(*args, k=5, seed=3)
  assert sorted(draws.item.tolist()) == [7, 8, 9]
  assert draws.rank.tolist() == [0, 1, 2]
  assert draws.short == 2


def test_zero_weight_items_are_never_drawn():
  args = list(_one_user_history([], [], 6))
  args[-1] = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 3.0])
  draws = sample_negatives(*args, k=4, seed=1)
  assert sorted(draws.item.tolist()) == [1, 3, 5]  # only positive weights
  assert draws.short == 1


def test_every_positive_gets_k_distinct_unseen_items():
  rows = _interactions(seed=5)
  catalogue = build_catalogue([_catalogue()], 'item', 'uniform')
  batch, short = negatives_table(pa.Table.from_batches([rows]), catalogue,
                                 k=5, seed=9, id_field='id', **FIELDS)
  assert short == 0
  assert batch.num_rows == 5 * _check_definition(rows, batch.to_pylist(), 5)


@pytest.mark.parametrize('rounds', [0, 1])
def test_the_exhaustive_draw_keeps_the_definition(rounds):
  # rounds=0: every positive takes the exhaustive draw; 1: most are done
  # after one round, the heavy users' positives finish exhaustively.
  rows = _interactions(seed=5)
  users = rows.column('user').to_numpy()
  times = rows.column('ts').to_numpy()
  ids = rows.column('id').to_numpy()
  draws = sample_negatives(users, rows.column('item').to_numpy(), times,
                           rows.column('label').to_numpy() == 1,
                           ids.astype(np.uint64), np.ones(ITEMS), k=5, seed=9,
                           rounds=rounds)
  assert draws.short == 0
  negatives = [{'user': u, 'item': i, 'ts': t, 'label': 0, NEGATIVE_OF: n,
                NEGATIVE_RANK: r} for u, i, t, n, r in zip(
                    users[draws.positive_row].tolist(), draws.item.tolist(),
                    times[draws.positive_row].tolist(),
                    ids[draws.positive_row].tolist(), draws.rank.tolist())]
  assert len(negatives) == 5 * _check_definition(rows, negatives, 5)


def _fresh_positives(n, m, weights, k, seed, rounds=6):
  """n positives of n users with no history (item -1: not in the
  catalogue) -> count of each catalogue item among the draws."""
  draws = sample_negatives(np.arange(n), np.full(n, -1), np.zeros(n),
                           np.ones(n, dtype=bool),
                           np.arange(n, dtype=np.uint64), weights, k, seed,
                           rounds=rounds)
  assert len(draws.item) == n * k
  return np.bincount(draws.item, minlength=m)


def test_popularity_weights_follow_the_weights():
  # Zipf weights over 100 items: the top 10 hold 0.57 of the weight
  # (sum 1/r for r<=10 over r<=100: 2.929 / 5.187). 4000 single draws:
  # sd of the share is about 0.008, so +-0.03 is ~4 sd.
  m = 100
  weights = 1.0 / np.arange(1, m + 1)
  counts = _fresh_positives(4000, m, weights, 1, seed=2)
  assert abs(counts[:10].sum() / 4000 - 0.565) < 0.03
  assert counts[0] > 5 * counts[50:60].mean()
  # The exhaustive draw (Efraimidis-Spirakis) follows them as well.
  counts = _fresh_positives(4000, m, weights, 1, seed=2, rounds=0)
  assert abs(counts[:10].sum() / 4000 - 0.565) < 0.03


def test_uniform_covers_the_catalogue_evenly():
  # 6000 draws over 100 items: 60 expected per item, sd ~7.7; [30, 95]
  # is a ~4 sd band.
  counts = _fresh_positives(2000, 100, np.ones(100), 3, seed=4)
  assert counts.min() >= 30 and counts.max() <= 95
  assert abs(counts[:10].sum() / 6000 - 0.1) < 0.03


def test_draws_depend_on_the_seed_and_the_key_not_the_neighbours():
  rows = _interactions(seed=1)
  catalogue = build_catalogue([_catalogue()], 'item', 'uniform')
  table = pa.Table.from_batches([rows])
  whole, _ = negatives_table(table, catalogue, k=3, seed=5, **FIELDS)
  # Only user 7's rows: the same negatives as user 7's part of the whole.
  user7 = table.filter(pc.equal(table.column('user'), 7))
  alone, _ = negatives_table(user7, catalogue, k=3, seed=5, **FIELDS)
  assert alone.num_rows > 0
  assert _rows([alone]) == [r for r in _rows([whole]) if r[0] == 7]
  other, _ = negatives_table(table, catalogue, k=3, seed=6, **FIELDS)
  assert _rows([other]) != _rows([whole])


def test_negative_of_is_the_positive_key_without_an_id():
  rows = _interactions(seed=2, rows=300)
  catalogue = build_catalogue([_catalogue()], 'item', 'uniform')
  batch, _ = negatives_table(pa.Table.from_batches([rows]), catalogue, k=2,
                             seed=1, **FIELDS)
  keys = positive_key(rows, 'user', 'item', 'ts').to_pylist()
  positives = {key: label for key, label in
               zip(keys, rows.column('label').to_pylist()) if label == 1}
  assert set(batch.column(NEGATIVE_OF).to_pylist()) == set(positives)
  assert batch.schema.names == ['user', 'item', 'ts', 'label', NEGATIVE_OF,
                                NEGATIVE_RANK]


# The Beam transform --------------------------------------------------------
def _run(rows, catalogue, shards, seed=11, k=4, strategy='uniform',
         id_field='id', check=None):
  """Runs NegativeSampling on one pipeline; returns the PipelineResult."""
  p = TestPipeline()
  negatives = ((p | 'Rows' >> beam.Create(rows),
                p | 'Catalogue' >> beam.Create(catalogue))
               | NegativeSampling(k=k, strategy=strategy, seed=seed,
                                  num_shards=shards, id_field=id_field,
                                  **FIELDS))
  if check is not None:
    assert_that(negatives, check)
  result = p.run()
  result.wait_until_finish()
  return result


def _counter(result, name):
  counters = result.metrics().query(
      MetricsFilter().with_namespace('mlpipe').with_name(name))['counters']
  return sum(c.committed for c in counters)


def _in_rows(expected):
  """An assert_that check: the batches hold exactly the `expected` rows."""
  def check(batches):
    equal_to(expected)(_rows(batches))
  return check


def test_same_rows_on_reruns_and_for_1_3_16_shards():
  rows = _interactions(seed=3)
  # Three input batches and two catalogue parts, so shards mix batches.
  parts = [rows.slice(0, 500), rows.slice(500, 600), rows.slice(1100)]
  catalogue = [_catalogue(30), _catalogue().slice(30)]
  counts = np.bincount(rows.column('item').to_numpy(), minlength=ITEMS)
  expected = {}
  for strategy in ('uniform', 'popularity'):
    # The whole input as one shard, computed without Beam.
    whole, _ = negatives_table(
        pa.Table.from_batches([rows]),
        build_catalogue([_catalogue()], 'item', strategy,
                        (np.arange(ITEMS), counts)),
        k=4, seed=11, id_field='id', **FIELDS)
    expected[strategy] = _rows([whole])
    assert len(expected[strategy]) == 4 * _check_definition(rows, [
        dict(zip(whole.schema.names, r)) for r in expected[strategy]], 4)
  assert expected['uniform'] != expected['popularity']
  for run_shards in ((1, 3, 16), (3,)):  # the second run: a rerun
    with TestPipeline() as p:
      inputs = (p | 'Rows' >> beam.Create(parts),
                p | 'Catalogue' >> beam.Create(catalogue))
      for strategy in expected:
        for shards in run_shards:
          negatives = inputs | f'Sample[{strategy},{shards}]' >> (
              NegativeSampling(k=4, strategy=strategy, seed=11,
                               num_shards=shards, id_field='id', **FIELDS))
          assert_that(negatives, _in_rows(expected[strategy]),
                      label=f'Check[{strategy},{shards}]')


def test_string_ids_and_counters():
  # Users and items as strings; user 'heavy' has seen 8 of the 10 items
  # before its positive at t=100, so it can get 2 negatives of k=4.
  users = ['heavy'] * 9 + ['light'] * 2
  items = [f'i{j}' for j in range(9)] + ['i0', 'i1']
  ts = [10] * 8 + [100] + [5, 100]
  label = [0] * 8 + [1] + [0, 1]
  rows = pa.RecordBatch.from_pydict({'user': users, 'item': items, 'ts': ts,
                                     'label': label})
  catalogue = pa.RecordBatch.from_pydict(
      {'item': [f'i{j}' for j in range(10)]})

  def check(batches):
    got = collections.defaultdict(set)
    for r in _rows(batches):
      got[r[4]].add(r[1])
    assert set(got) == {'heavy|100|i8', 'light|100|i1'}
    # heavy saw i0..i7 before, i8 at t: i9 is the one unseen item.
    assert got['heavy|100|i8'] == {'i9'}
    assert len(got['light|100|i1']) == 4
    assert not got['light|100|i1'] & {'i0', 'i1'}

  result = _run([rows], [catalogue], 3, id_field=None, check=check)
  assert _counter(result, 'negatives_sampled') == 5
  assert _counter(result, 'negatives_short') == 3


def test_popularity_counts_the_input_when_the_catalogue_has_no_weights():
  # Background users give item j (0..39) 40 - j interactions; items 40..49
  # have none. 300 fresh users each have one positive on item 99 (not in
  # the catalogue), so everything is unseen for them and draws follow the
  # counts: items 0..9 hold 355 of 820 interactions, 30..39 hold 55
  # (ratio 6.5, less without replacement within a positive's 4).
  bg_items = np.repeat(np.arange(40), np.arange(40, 0, -1))
  n = len(bg_items)
  rows = pa.RecordBatch.from_pydict({
      'id': np.arange(n + 300),
      'user': np.concatenate([np.full(n, 10_000), np.arange(300)]),
      'item': np.concatenate([bg_items, np.full(300, 99)]),
      'ts': np.zeros(n + 300, dtype=np.int64),
      'label': np.concatenate([np.zeros(n), np.ones(300)]).astype(np.int64),
  })

  def check(batches):
    counts = np.bincount(np.concatenate(
        [b.column('item').to_numpy() for b in batches]), minlength=50)
    assert counts.sum() == 1200
    assert counts[40:].sum() == 0
    assert counts[:10].sum() > 3 * counts[30:40].sum()

  _run([rows], [_catalogue(50)], 4, strategy='popularity', check=check)


def test_a_weight_column_overrides_the_counts():
  rows = pa.RecordBatch.from_pydict({
      'id': np.arange(200), 'user': np.arange(200),
      'item': np.full(200, 99), 'ts': np.zeros(200, dtype=np.int64),
      'label': np.ones(200, dtype=np.int64)})
  # Only items 3 and 7 have weight: every positive gets exactly those.

  def check(batches):
    assert sorted(set(np.concatenate(
        [b.column('item').to_numpy() for b in batches]).tolist())) == [3, 7]

  weight = np.zeros(10)
  weight[[3, 7]] = [1.0, 5.0]
  result = _run([rows], [_catalogue(10, weight)], 2, strategy='popularity',
                k=3, check=check)
  assert _counter(result, 'negatives_sampled') == 400
  assert _counter(result, 'negatives_short') == 200


def test_bad_settings_fail_at_construction():
  with pytest.raises(ValueError, match='strategy'):
    NegativeSampling(k=1, strategy='popular', seed=0, **FIELDS)
  with pytest.raises(ValueError, match='k must be'):
    NegativeSampling(k=0, seed=0, **FIELDS)
