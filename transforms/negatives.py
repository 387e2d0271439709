"""Negative sampling for implicit-feedback recommenders.

The concept. A positive is an interaction row with label == 1 (user u,
item i, event time t). Its negatives are k rows (u, j, t, label 0) whose
items j are drawn from the catalogue among the items u had NOT interacted
with at or before t: any row of u with item j and time <= t, whatever its
label, makes j "seen" (an interaction at exactly t is excluded too, so the
positive's own item and anything logged with it are never negatives).
Later interactions do not count: an item the user only meets after t is a
fair negative at t, as it was at serving time. The k items of one positive
are distinct.

Strategies (the item distribution before the "unseen" filter):
  * 'uniform': every catalogue item equally (a catalogue `weight` column is
    ignored);
  * 'popularity': the catalogue's `weight` column when it has one, else an
    item's number of interactions (rows of any label) in the input, counted
    with a Beam combine and fed to the samplers as a side input. An item of
    weight 0 (e.g. never interacted with) is never drawn.
Items of the input that are not in the catalogue are never drawn (they
still count as seen, to no effect); catalogue duplicates count once (their
weights summed).

Determinism. The candidates of a positive depend only on (seed, the
positive's key, attempt number): attempt a of key K is splitmix64 of a
counter in the stream seeded by splitmix64(K ^ splitmix64(seed)), mapped
to [0, 1) and to an item by `np.searchsorted` on the cumulative weights.
The negatives are the first k distinct unseen candidates in attempt order;
which rows meet in a shard, bundle order and the shard count change
nothing, so reruns and any `num_shards` give the same rows. The key is a hash of
the `id_field` value when given, else of the string user|timestamp|item.

Short positives. Sampling runs in at most ROUNDS vectorised rejection
rounds. Positives still short after them (their user has seen most of the
weighted catalogue) get an exhaustive draw over the unseen items:
weighted sampling without replacement by Efraimidis-Spirakis keys
log(u) / w, u hashed from (key, item), so it is as deterministic as the
rounds and never loops. If fewer than k unseen items of positive weight
exist at all, the positive gets all of them: fewer than k rows, and the
missing ones are added to the counter `negatives_short` (so that
negatives_sampled + negatives_short == k * positives).

How it is computed: rows are split into shards by a hash of the user
(`transforms.common.split_by_shard`) and grouped, so every row of a user
meets in one shard; each shard is one `sample_negatives` call, NumPy on
whole columns. "Seen at or before t" is a `searchsorted` lookup of the
int64 code (user code * items + item index) in the sorted first-interaction
table of the shard.

    (rows, catalogue) | NegativeSampling('user_id', 'item_id', 'event_time',
                                         'label', k=4, strategy='popularity',
                                         seed=7)

Rows whose user or timestamp is null are ignored; a null label is 0.
"""

from typing import List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.common import (DEFAULT_SHARDS, Counters, concat_batches,
                               pieces, split_by_shard, splitmix64)

STRATEGIES = ('uniform', 'popularity')
WEIGHT = 'weight'
NEGATIVE_OF = 'negative_of'
NEGATIVE_RANK = 'negative_rank'
# Rejection rounds before the exhaustive draw; each draws
# candidates_per_round(k) items per positive still short. If its user has
# seen a fraction f of the weighted catalogue, a positive stays short after
# all rounds with probability about P(Binomial(ROUNDS * candidates, 1 - f)
# < k): only users who have seen most of the catalogue reach the
# exhaustive draw.
ROUNDS = 6
# Attempt numbers of the exhaustive draw start here (past any round's).
_EXHAUSTIVE_ATTEMPT = np.uint64(1 << 40)
# Cells of one exhaustive-draw chunk (short positives x catalogue items).
_EXHAUSTIVE_CELLS = 1 << 22

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


# Counter-based randomness -----------------------------------------------------
def _stream(base: np.ndarray, attempts: np.ndarray) -> np.ndarray:
  """Attempt `attempts` (uint64, broadcast) of the streams seeded by
  `base`: the splitmix64 sequence, so attempts are independent."""
  with np.errstate(over='ignore'):
    return splitmix64(base + attempts * _GOLDEN)


def _unit(h: np.ndarray) -> np.ndarray:
  """uint64 -> float64 in (0, 1): the top 53 bits, centred (never 0, so
  its log is finite)."""
  return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def hash_values(values: np.ndarray) -> np.ndarray:
  """uint64 hash of each value (ints or strings), the same in every process
  and run (pandas' SipHash with a fixed key, as `shard_of`)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if values.dtype.kind not in 'iub':
    values = values.astype(object)
  return pd.util.hash_array(values, categorize=False)


# The sampler, on NumPy arrays -------------------------------------------------
class Draws(NamedTuple):
  """Negatives of one `sample_negatives` call: row i is a negative of input
  row positive_row[i] with catalogue item index item[i], its rank among
  that positive's negatives (0..k-1, in draw order); `short` is the number
  of negatives missing (positives with fewer than k unseen items)."""
  positive_row: np.ndarray
  item: np.ndarray
  rank: np.ndarray
  short: int


def _first_distinct(seq: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """Per row of `seq` (int64, -1 = nothing), its first k distinct values
  >= 0 in column order: ((rows, k) padded with -1, count per row)."""
  q, w = seq.shape
  row = np.repeat(np.arange(q), w)
  pos = np.tile(np.arange(w), q)
  val = seq.ravel()
  ok = val >= 0
  row, pos, val = row[ok], pos[ok], val[ok]
  # Sorted by (row, value, position): the first of each run is the first
  # occurrence of that value in the row.
  order = np.lexsort((pos, val, row))
  dup = np.zeros(len(order), dtype=bool)
  dup[1:] = ((row[order][1:] == row[order][:-1])
             & (val[order][1:] == val[order][:-1]))
  kept = order[~dup]
  kept = kept[np.lexsort((pos[kept], row[kept]))]  # back to column order
  kept_row = row[kept]
  rank = np.arange(len(kept)) - np.searchsorted(kept_row, kept_row)
  take = rank < k
  out = np.full((q, k), -1, dtype=np.int64)
  out[kept_row[take], rank[take]] = val[kept][take]
  return out, np.bincount(kept_row[take], minlength=q)


class _Seen:
  """(user code, item index) -> time of the first interaction, as a sorted
  int64 code array for vectorised "seen at or before t" lookups."""

  def __init__(self, users, items, times, num_items: int):
    known = items >= 0
    self._m = max(num_items, 1)
    code = users[known] * self._m + items[known]
    order = np.lexsort((times[known], code))
    code, first_time = code[order], times[known][order]
    first = np.ones(len(code), dtype=bool)
    first[1:] = code[1:] != code[:-1]
    self._code, self._time = code[first], first_time[first]

  def at_or_before(self, users, items, times) -> np.ndarray:
    """Broadcast arrays -> bool: had the user interacted with the item at
    or before the time?"""
    code = users * self._m + items
    if not len(self._code):
      return np.zeros(np.shape(code), dtype=bool)
    j = np.searchsorted(self._code, code)
    jc = np.minimum(j, len(self._code) - 1)
    return (j < len(self._code)) & (self._code[jc] == code) & (
        self._time[jc] <= times)


def candidates_per_round(k: int) -> int:
  """Candidates drawn per short positive per round: a function of k only,
  so attempt numbers (and so the draws) never depend on the shard."""
  return max(2 * k, 8)


def sample_negatives(users: np.ndarray, items: np.ndarray, times: np.ndarray,
                     positive: np.ndarray, keys: np.ndarray,
                     weights: np.ndarray, k: int, seed: int,
                     rounds: int = ROUNDS) -> Draws:
  """Draws k unseen catalogue items per positive row (the module docstring
  has the definition).

  Args (NumPy arrays over the rows of one or more whole users):
    users: int64 user code per row (equal codes = same user).
    items: int64 catalogue index of each row's item, -1 if not in it.
    times: int64 event time per row.
    positive: bool per row, True for the rows to sample for.
    keys: uint64 per row, the positive's identity (used for positives).
    weights: float64 per catalogue item, >= 0; 0 is never drawn.
  """
  users = np.asarray(users, dtype=np.int64)
  items = np.asarray(items, dtype=np.int64)
  times = np.asarray(times, dtype=np.int64)
  weights = np.asarray(weights, dtype=np.float64)
  rows = np.flatnonzero(positive)
  p, m = len(rows), len(weights)
  chosen = np.full((p, k), -1, dtype=np.int64)
  count = np.zeros(p, dtype=np.int64)
  drawable = weights > 0
  if p and k and drawable.any():
    seen = _Seen(users, items, times, m)
    p_user, p_time = users[rows], times[rows]
    base = splitmix64(np.asarray(keys, dtype=np.uint64)[rows]
                      ^ splitmix64(np.uint64(seed & _MASK64)))
    cum = np.cumsum(weights)
    last = int(np.flatnonzero(drawable)[-1])  # float edge: u * total == total
    per_round = candidates_per_round(k)
    short = np.arange(p)
    for r in range(rounds):
      short = short[count[short] < k]
      if not len(short):
        break
      attempt = np.arange(r * per_round, (r + 1) * per_round, dtype=np.uint64)
      u = _unit(_stream(base[short, None], attempt[None, :]))
      cand = np.minimum(np.searchsorted(cum, u * cum[-1], side='right'), last)
      unseen = ~seen.at_or_before(p_user[short, None], cand,
                                  p_time[short, None])
      seq = np.concatenate([chosen[short], np.where(unseen, cand, -1)], axis=1)
      chosen[short], count[short] = _first_distinct(seq, k)
    _exhaustive(seen, p_user, p_time, base, drawable, weights, chosen, count,
                np.flatnonzero(count < k))
  rr, rank = np.nonzero(chosen >= 0)  # row-major: positive, then rank
  return Draws(rows[rr], chosen[rr, rank], rank,
               int(k * p - count.sum()))


def _exhaustive(seen, p_user, p_time, base, drawable, weights, chosen, count,
                short):
  """Fills `chosen`/`count` of the `short` positives in place from all
  their unseen items: weighted without replacement (Efraimidis-Spirakis
  keys log(u) / w, largest first), chunked to bound memory."""
  m, k = len(weights), chosen.shape[1]
  item = np.arange(m)
  attempt = _EXHAUSTIVE_ATTEMPT + item.astype(np.uint64)
  step = max(1, _EXHAUSTIVE_CELLS // max(m, 1))
  for start in range(0, len(short), step):
    part = short[start:start + step]
    eligible = drawable[None, :] & ~seen.at_or_before(
        p_user[part, None], item[None, :], p_time[part, None])
    rr, cc = np.nonzero(chosen[part] >= 0)
    eligible[rr, chosen[part][rr, cc]] = False
    with np.errstate(divide='ignore'):
      score = np.log(_unit(_stream(base[part, None], attempt[None, :]))) / (
          weights[None, :])
    score[~eligible] = -np.inf
    top = np.argsort(-score, axis=1, kind='stable')[:, :k]
    # Eligible items sort first, so the picks of a row are a prefix.
    need = k - count[part]
    pick = (np.take_along_axis(eligible, top, axis=1)
            & (np.arange(top.shape[1])[None, :] < need[:, None]))
    pr, col = np.nonzero(pick)
    chosen[part[pr], count[part][pr] + col] = top[pr, col]
    count[part] += pick.sum(axis=1)


# Arrow columns <-> NumPy ------------------------------------------------------
def _values(column, name: str) -> np.ndarray:
  """An id column (ints or strings) -> NumPy int64 or str array, sortable
  and comparable with `searchsorted`."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  if pa.types.is_integer(column.type):
    return column.to_numpy(zero_copy_only=False).astype(np.int64)
  if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=str)
  raise TypeError(f'NegativeSampling: column {name!r} must hold integer or '
                  f'string ids, got {column.type}')


def positive_key(batch, user_field: str, item_field: str,
                 timestamp_field: str) -> pa.Array:
  """The `negative_of` value NegativeSampling gives the negatives of each
  row when no id_field is set: 'user|timestamp|item' as a string (join a
  positive to its negatives on it)."""
  return pc.binary_join_element_wise(
      pc.cast(batch.column(user_field), pa.string()),
      pc.cast(batch.column(timestamp_field), pa.string()),
      pc.cast(batch.column(item_field), pa.string()), '|')


class Catalogue(NamedTuple):
  """The candidate items: `items` sorted and distinct (NumPy, for
  lookups), `arrow` the same as an Arrow array (for output), and the
  sampling weight of each."""
  items: np.ndarray
  arrow: pa.Array
  weights: np.ndarray

  def index_of(self, values: np.ndarray) -> np.ndarray:
    """Catalogue index of each value, -1 if it is not in the catalogue."""
    if not len(self.items) or not len(values):
      return np.full(len(values), -1, dtype=np.int64)
    if (self.items.dtype.kind == 'i') != (values.dtype.kind == 'i'):
      raise TypeError('NegativeSampling: the catalogue and the rows must '
                      'both hold integer item ids or both string ids')
    j = np.searchsorted(self.items, values)
    jc = np.minimum(j, len(self.items) - 1)
    return np.where(self.items[jc] == values, jc, -1).astype(np.int64)


def build_catalogue(batches: List[pa.RecordBatch], item_field: str,
                    strategy: str, counts=None) -> Catalogue:
  """Catalogue RecordBatches (column `item_field`, optional `weight`) ->
  the Catalogue. Weights: 1 for 'uniform'; for 'popularity' the `weight`
  column if present, else `counts` (item values, interaction counts)."""
  batches = [b for b in batches if b.num_rows]
  if not batches:
    return Catalogue(np.zeros(0, dtype=np.int64), pa.array([], pa.int64()),
                     np.zeros(0))
  table = concat_batches(batches)
  column = table.column(item_field).combine_chunks()
  valid = pc.is_valid(column)
  table = table.filter(valid)
  values = _values(table.column(item_field), item_field)
  items, first, inverse = np.unique(values, return_index=True,
                                    return_inverse=True)
  arrow = table.column(item_field).combine_chunks().take(pa.array(first))
  if strategy == 'uniform':
    weights = np.ones(len(items))
  elif WEIGHT in table.column_names:
    raw = table.column(WEIGHT).to_numpy()
    raw = np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0)
    if (raw < 0).any():
      raise ValueError('NegativeSampling: the catalogue has a negative '
                       'weight')
    weights = np.bincount(inverse, weights=raw, minlength=len(items))
  else:
    weights = np.zeros(len(items))
    if counts is not None and len(counts[0]):
      index = Catalogue(items, arrow, weights).index_of(counts[0])
      known = index >= 0
      weights[index[known]] = counts[1][known]
  return Catalogue(items, arrow, weights.astype(np.float64))


class _ItemCounts(beam.CombineFn):
  """RecordBatches -> (distinct item values, interactions of each), both
  NumPy arrays: the popularity of every item in the input."""

  def __init__(self, item_field: str):
    self._item_field = item_field

  def create_accumulator(self):
    return None

  @staticmethod
  def _merge(parts):
    parts = [a for a in parts if a is not None and len(a[0])]
    if not parts:
      return None
    values = np.concatenate([a[0] for a in parts])
    counts = np.concatenate([a[1] for a in parts])
    items, inverse = np.unique(values, return_inverse=True)
    return items, np.bincount(inverse, weights=counts,
                              minlength=len(items)).astype(np.int64)

  def add_input(self, accumulator, batch):
    column = batch.column(self._item_field)
    column = column.filter(pc.is_valid(column))
    values, counts = np.unique(_values(column, self._item_field),
                               return_counts=True)
    return self._merge([accumulator, (values, counts)])

  def merge_accumulators(self, accumulators):
    return self._merge(list(accumulators))

  def extract_output(self, accumulator):
    return accumulator


def negatives_table(table: pa.Table, catalogue: Catalogue, *,
                    user_field: str, item_field: str, timestamp_field: str,
                    label_field: str, k: int, seed: int,
                    id_field: Optional[str] = None
                    ) -> Tuple[pa.RecordBatch, int]:
  """Rows of whole users (pa.Table) -> (RecordBatch of their negatives,
  negatives missing). One shard of NegativeSampling; on the whole input it
  gives exactly the transform's output, whatever its num_shards."""
  table = table.filter(pc.and_(pc.is_valid(table.column(user_field)),
                               pc.is_valid(table.column(timestamp_field))))
  users = _values(table.column(user_field), user_field)
  user_code = np.unique(users, return_inverse=True)[1]
  item_col = table.column(item_field).combine_chunks()
  item_ok = pc.is_valid(item_col).to_numpy(zero_copy_only=False)
  items = np.full(table.num_rows, -1, dtype=np.int64)
  if item_ok.any():
    items[item_ok] = catalogue.index_of(
        _values(item_col.filter(pa.array(item_ok)), item_field))
  times = table.column(timestamp_field).to_numpy().astype(np.int64)
  label = pc.fill_null(pc.cast(table.column(label_field), pa.int64()), 0)
  positive = label.to_numpy() == 1
  if id_field is not None:
    negative_of = table.column(id_field).combine_chunks()
    keys = hash_values(_values(negative_of, id_field))
  else:
    negative_of = positive_key(table, user_field, item_field,
                               timestamp_field).combine_chunks()
    keys = hash_values(negative_of.to_numpy(zero_copy_only=False))
  draws = sample_negatives(user_code, items, times, positive, keys,
                           catalogue.weights, k, seed)
  take = pa.array(draws.positive_row, type=pa.int64())
  batch = pa.RecordBatch.from_arrays([
      table.column(user_field).combine_chunks().take(take),
      catalogue.arrow.take(pa.array(draws.item, type=pa.int64())),
      table.column(timestamp_field).combine_chunks().take(take),
      pa.array(np.zeros(len(draws.item), dtype=np.int64)),
      negative_of.take(take),
      pa.array(draws.rank.astype(np.int64)),
  ], names=[user_field, item_field, timestamp_field, label_field,
            NEGATIVE_OF, NEGATIVE_RANK])
  return batch, draws.short


class _SampleShard(beam.DoFn):
  """(shard, [RecordBatch of rows]) + the Catalogue -> RecordBatch of
  negatives (user, item, timestamp, label, negative_of, negative_rank)."""

  def __init__(self, **settings):
    self._settings = settings

  def setup(self):
    self._counters = Counters()

  def process(self, element, catalogue: Catalogue):
    _, batches = element
    batch, short = negatives_table(concat_batches(list(batches)), catalogue,
                                   **self._settings)
    self._counters.inc('negatives_sampled', batch.num_rows)
    self._counters.inc('negatives_short', short)
    yield from pieces(batch)


class NegativeSampling(beam.PTransform):
  """k negatives per positive interaction, unseen by the user at that time.

  (PCollection[pa.RecordBatch] of interaction rows,
   PCollection[pa.RecordBatch] of catalogue items)
    -> PCollection[pa.RecordBatch] of negative rows.

  Applied to a pair, as CoGroupByKey is: `(rows, catalogue) |
  NegativeSampling(...)`. The rows have `user_field`, `item_field` (int or
  string ids), `timestamp_field` (int64 epoch microseconds), `label_field`
  (0/1; 1 = positive), `id_field` if given, any others (ignored). The
  catalogue has `item_field` (same id type) and optionally `weight`.

  Output columns, nothing else (join the rest yourself): user_field,
  item_field, timestamp_field (the positive's user and time), label_field
  (0, int64), `negative_of` (the positive's id_field value, else the
  string `positive_key` of user|timestamp|item) and `negative_rank`
  (int64, 0..k-1 in draw order). Exactly k rows per positive unless its
  user has seen nearly everything (counter `negatives_short`, see the
  module docstring). Counters (namespace 'mlpipe'): negatives_sampled,
  negatives_short.
  """

  def __init__(self, user_field: str, item_field: str, timestamp_field: str,
               label_field: str, k: int, strategy: str = 'uniform', *,
               seed: int, num_shards: int = DEFAULT_SHARDS,
               id_field: Optional[str] = None):
    super().__init__()
    if strategy not in STRATEGIES:
      raise ValueError(f'NegativeSampling: unknown strategy {strategy!r}; use '
                       f'one of {", ".join(STRATEGIES)}')
    if int(k) < 1:
      raise ValueError(f'NegativeSampling: k must be >= 1, got {k}')
    if int(num_shards) < 1:
      raise ValueError(f'NegativeSampling: num_shards must be >= 1, got '
                       f'{num_shards}')
    self.user_field = user_field
    self.item_field = item_field
    self.timestamp_field = timestamp_field
    self.label_field = label_field
    self.k = int(k)
    self.strategy = strategy
    self.seed = int(seed)
    self.num_shards = int(num_shards)
    self.id_field = id_field

  def expand(self, pcolls):
    rows, catalogue = pcolls
    counts = None
    if self.strategy == 'popularity':
      # Always counted: whether the catalogue has a weight column is only
      # known at run time (the count is one cheap combine).
      counts = beam.pvalue.AsSingleton(
          rows | 'CountInteractionsPerItem' >> beam.CombineGlobally(
              _ItemCounts(self.item_field)))
    sampler = (
        catalogue
        | 'CollectCatalogue' >> beam.combiners.ToList()
        | 'WeighCatalogue' >> beam.Map(build_catalogue, self.item_field,
                                       self.strategy, counts))
    return (
        rows
        | 'ShardByUser' >> beam.FlatMap(split_by_shard, self.user_field,
                                        self.num_shards)
        | 'GroupUserRows' >> beam.GroupByKey()
        | 'SampleUnseenItems' >> beam.ParDo(
            _SampleShard(user_field=self.user_field,
                         item_field=self.item_field,
                         timestamp_field=self.timestamp_field,
                         label_field=self.label_field, k=self.k,
                         seed=self.seed, id_field=self.id_field),
            beam.pvalue.AsSingleton(sampler)))

