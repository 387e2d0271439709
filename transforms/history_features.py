"""Point-in-time history features per entity (e.g. per user).

The concept. For a record at event time t, a window of length w covers the
same entity's records with  t - w <= t_j < t : strictly before t, so
records that share the exact event time never see each other (ties are
excluded in both directions), and a record exactly w old is still inside
the window. Which windows and aggregates exist is declared in the dataset's
`history:` section (`Dataset.history_feature_types()` names them):

  * count, sum, mean, max of the value field per window (0 / 0.0 if empty);
    sums of a `cents` field are exact integer sums of cents, so a result
    never depends on the order in which records were added or expired;
  * distinct values of a field per window, and "is new": 1 if the record's
    own value does not occur in the window;
  * value / mean over a window (1.0 when that mean is not positive);
  * seconds since the entity's previous record in the longest window
    (capped at that window: the horizon); the UTC hour of the event.

How it is computed. `history_table` takes an Arrow table of any number of
entities, sorts it by (entity, event time, id) and turns every window into
an index range [lo, hi) of that order, found by `searchsorted` on an int64
key (entity code, dense rank of the event time): exact integer arithmetic,
so ties and the closed lower bound are exact. Then, all with NumPy on whole
columns: count = hi - lo; sum = a prefix sum of int64 cents; max = a sparse
table (range maximum); distinct = rows of [lo, hi) whose previous
occurrence of the same (entity, value) lies before lo, counted over dyadic
blocks (a merge-sort tree, one level at a time); "is new" = the last
occurrence of (entity, value) before hi lies before lo. Results equal the
record-at-a-time definition bit for bit (tests/test_history.py keeps that
definition as the reference). A value field without `cents` is summed with
`math.fsum` row by row: exact, and the one slow path.

Both forms:
  * batch, `HistoryFeatures`: PCollection[pa.RecordBatch] of records ->
    PCollection[pa.RecordBatch] of feature rows. Rows are split into shards
    by a hash of the entity (`transforms.common.split_by_shard`), so the
    shuffle moves a few (shard, RecordBatch) pairs and every record of an
    entity meets in one shard; each shard is one `history_table` call.
  * streaming, `StatefulHistoryFeatures`: PCollection[pa.RecordBatch] ->
    PCollection[pa.RecordBatch], a stateful DoFn per shard of entities
    holding the shard's recent records as one Arrow table; rows wait for
    the watermark, then `history_table` runs on the retained history and
    the ready rows at once. Every history runs on the input side by side
    and a stateful join per shard of record ids reunites a record's
    parts; state expires by the watermark. With on-time events (in any
    arrival order, on any number of shards) both forms give equal rows.
"""

import math
from typing import Dict, Iterator, List, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec,
                                              ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from apache_beam.utils.timestamp import Timestamp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import Dataset, HistorySpec
from transforms import common
from transforms.common import (DEFAULT_SHARDS, MICROS, concat_batches, slices,
                               table_to_batch,
                               split_by_shard)

_INT64_LIMIT = 2**63


# Index arithmetic -------------------------------------------------------------
class _Windows:
  """Rows in (entity, time, id) order and their window bounds.

  `key` orders the rows by (entity, time) as one int64, non-decreasing over
  the rows, so the first row of the same entity at or after any time is one
  `searchsorted` away. It is entity * span + (t - earliest t) when that
  fits in an int64 (a shard's few months of microseconds do), else entity *
  (number of distinct times + 1) + dense rank of t.
  """

  def __init__(self, table: pa.Table, dataset: Dataset, spec: HistorySpec):
    ts = dataset.timestamp_field
    times = table.column(ts)
    if times.null_count:
      raise ValueError(f'history features need {ts} on every record; '
                       f'{times.null_count} rows have none')
    entity, self.entity_values = _sorted_codes(table.column(spec.entity),
                                               with_values=True)
    self.order = pc.sort_indices(
        pa.table({'entity': entity, 'time': times,
                  'id': table.column(dataset.id_field)}),
        sort_keys=[('entity', 'ascending'), ('time', 'ascending'),
                   ('id', 'ascending')]).to_numpy()
    self.n = len(self.order)
    self.dataset = dataset
    self.t = times.to_numpy().astype(np.int64)[self.order]
    self.entity = entity[self.order]
    entities = int(self.entity[-1]) + 1
    self._t0 = int(self.t.min())
    self._span = int(self.t.max()) - self._t0 + 1
    self._unique_t = None
    if entities * self._span < _INT64_LIMIT:
      self._key = self.entity * self._span + (self.t - self._t0)
    else:
      self._unique_t = np.unique(self.t)
      self._m = len(self._unique_t) + 1
      if entities * self._m >= _INT64_LIMIT:
        raise OverflowError('entity x time rank does not fit an int64 key: '
                            'split the input into more shards')
      self._key = self.entity * self._m + np.searchsorted(self._unique_t,
                                                          self.t)
    # hi: the first row of the same entity with t_j >= t (ties excluded),
    # i.e. the first row of the run of equal keys.
    starts = np.zeros(self.n, dtype=np.int64)
    changed = np.flatnonzero(self._key[1:] != self._key[:-1]) + 1
    starts[changed] = changed
    self.hi = np.maximum.accumulate(starts)

  def lower(self, seconds: int) -> np.ndarray:
    """lo: the first row of the same entity with t_j >= t - w."""
    return self.first_at(self.entity, self.t - seconds * MICROS)

  def first_at(self, entity: np.ndarray, since: np.ndarray) -> np.ndarray:
    """The first row of `entity` (a code of this table) with t_j >= since
    (one past the entity's rows when none is)."""
    if self._unique_t is None:
      # Clipped: before the first time is the entity's first row, after the
      # last one past its rows (the next entity's first key).
      query = entity * self._span + np.clip(since - self._t0, 0, self._span)
    else:
      query = entity * self._m + np.searchsorted(self._unique_t, since,
                                                 side='left')
    return np.searchsorted(self._key, query, side='left')

  def codes_of(self, column) -> np.ndarray:
    """Entity values of other rows -> this table's codes (-1: unknown)."""
    if isinstance(column, pa.ChunkedArray):
      column = column.combine_chunks()
    found = pc.index_in(column, value_set=self.entity_values)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(
        np.int64)


def _dictionary(column) -> Tuple[np.ndarray, pa.Array]:
  """(int64 codes, distinct values): codes are equal exactly where the
  values are equal, as keys of a Python dict (None is a value of its own;
  0.0 and -0.0 are one value)."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  if pa.types.is_floating(column.type):
    column = pc.add(column, pa.scalar(0.0, column.type))   # -0.0 -> 0.0
  encoded = pc.dictionary_encode(column, null_encoding='encode')
  codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
  return codes, encoded.dictionary


def _sorted_codes(column, with_values: bool = False):
  """Codes as `_dictionary`'s, numbered in the values' sorted order (null
  last): sorting by them sorts by the values. With `with_values`, also the
  distinct values in code order."""
  codes, values = _dictionary(column)
  order = pc.sort_indices(values).to_numpy()
  rank = np.empty(len(values), dtype=np.int64)
  rank[order] = np.arange(len(values))
  if with_values:
    return rank[codes], values.take(pa.array(order))
  return rank[codes]


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray
               ) -> np.ndarray:
  """max(values[lo:hi]) per row, 0.0 where the range is empty: a sparse
  table built one level at a time (level k holds the max of 2^k rows), each
  row answered at the level of its range length by two overlapping blocks."""
  length = hi - lo
  out = np.zeros(len(lo), dtype=np.float64)
  levels = int(length.max()).bit_length() if len(lo) else 0
  table = values
  for k in range(levels):
    if k:
      half = 1 << (k - 1)
      table = np.concatenate([np.maximum(table[:-half], table[half:]),
                              table[-half:]])
    rows = np.flatnonzero((length >> k) == 1)   # 2^k <= length < 2^(k+1)
    if len(rows):
      out[rows] = np.maximum(table[lo[rows]], table[hi[rows] - (1 << k)])
  return out


def _dyadic_blocks(lo: np.ndarray, hi: np.ndarray
                   ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
  """(level b, rows, block starts): [lo, hi) of every row cut into aligned
  blocks of 2^b rows (at most two per level), as a segment tree would."""
  start = lo.copy()
  levels = int((hi - lo).max()).bit_length() if len(lo) else 0
  for b in range(levels):                    # up: clear low bits of start
    rows = np.flatnonzero(((start >> b) & 1).astype(bool) &
                          (start + (1 << b) <= hi))
    yield b, rows, start[rows]
    start[rows] += 1 << b
  for b in reversed(range(levels)):          # down: the rest, largest first
    rows = np.flatnonzero(start + (1 << b) <= hi)
    yield b, rows, start[rows]
    start[rows] += 1 << b


def _first_occurrences(prev: np.ndarray, lo: np.ndarray, hi: np.ndarray
                       ) -> np.ndarray:
  """#{j in [lo, hi) : prev[j] < lo} per row: the distinct values in
  [lo, hi) when prev[j] is the previous row with the value of row j.

  Each row's range is cut into dyadic blocks; per level the rows' prev
  values are sorted within blocks (key block * (n + 1) + prev + 1), so the
  count in a block is one `searchsorted`. O(n log^2 n) at worst, whatever
  the window sizes.
  """
  n = len(prev)
  out = np.zeros(len(lo), dtype=np.int64)
  sorted_by_level = {}
  for b, rows, starts in _dyadic_blocks(lo, hi):
    if not len(rows):
      continue
    if b == 0:
      out[rows] += prev[starts] < lo[rows]
      continue
    if b not in sorted_by_level:
      sorted_by_level[b] = np.sort((np.arange(n, dtype=np.int64) >> b) *
                                   (n + 1) + prev + 1)
    out[rows] += np.searchsorted(
        sorted_by_level[b], (starts >> b) * (n + 1) + lo[rows] + 1,
        side='left') - starts
  return out


class _Occurrences:
  """Rows of the same (entity, value), for one field, in row order."""

  def __init__(self, w: _Windows, column):
    codes, _ = _dictionary(column)
    pair = w.entity * (int(codes.max()) + 1) + codes   # < n * n: no overflow
    self._by_group = np.argsort(pair, kind='stable')   # rows ascending inside
    grouped = pair[self._by_group]
    group_sorted = np.zeros(w.n, dtype=np.int64)
    np.cumsum(grouped[1:] != grouped[:-1], out=group_sorted[1:])
    self._group = np.empty(w.n, dtype=np.int64)
    self._group[self._by_group] = group_sorted
    self._base = w.n + 1
    self._key = group_sorted * self._base + self._by_group   # increasing
    # prev: the previous row of the same (entity, value), -1 if none.
    self.prev = np.full(w.n, -1, dtype=np.int64)
    same = group_sorted[1:] == group_sorted[:-1]
    self.prev[self._by_group[1:][same]] = self._by_group[:-1][same]

  def seen(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """True where the row's own (entity, value) occurs in rows [lo, hi)."""
    pos = np.searchsorted(self._key, self._group * self._base + hi,
                          side='left') - 1      # last row of the pair < hi
    last = self._by_group[np.maximum(pos, 0)]
    return (pos >= 0) & (self._group[last] == self._group) & (last >= lo)


# The features -----------------------------------------------------------------
def _history_columns(table: pa.Table, dataset: Dataset, spec: HistorySpec
                     ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """(order, features): the rows' (entity, time, id) order and each of
  `spec`'s features (`spec.feature_types()` order) as a NumPy column in
  that order."""
  if table.num_rows == 0:
    return np.zeros(0, dtype=np.int64), _empty_features(spec)
  w = _Windows(table, dataset, spec)
  lows = {window: w.lower(seconds) for window, seconds in spec.windows.items()}
  return w.order, _features(table, w, spec, w.hi, lows, w.t, own=True)


def _empty_features(spec: HistorySpec) -> Dict[str, np.ndarray]:
  return {name: np.zeros(0, dtype=np.int64 if kind == 'int' else np.float64)
          for name, kind in spec.feature_types().items()}


def history_at(events: pa.Table, entities, times: np.ndarray,
               dataset: Dataset, spec: HistorySpec) -> Dict[str, np.ndarray]:
  """`spec`'s features at query points (entity value, event time) that are
  not events themselves, from `events` (records with the record fields):
  exactly the features a record of that entity at that time would have
  (windows over the entity's events strictly before the time). E.g. an
  item's history at the time a sampled negative shows it to a user.
  Features that need the query's own value (novelty, ratio_to_mean) are
  refused by the declaration check for such specs."""
  times = np.asarray(times, dtype=np.int64)
  if events.num_rows == 0 or not len(times):
    empty = _empty_features(spec)
    return {name: np.zeros(len(times), dtype=column.dtype)
            for name, column in empty.items()}
  events = _as_table(events, dataset)
  w = _Windows(events, dataset, spec)
  codes = w.codes_of(entities)
  known = codes >= 0
  hi = np.where(known, w.first_at(np.maximum(codes, 0), times), 0)
  lows = {window: np.where(known, w.first_at(np.maximum(codes, 0),
                                             times - seconds * MICROS), 0)
          for window, seconds in spec.windows.items()}
  return _features(events, w, spec, hi, lows, times, own=False)


def _features(table: pa.Table, w: '_Windows', spec: HistorySpec,
              hi: np.ndarray, lows: Dict[str, np.ndarray], t: np.ndarray,
              own: bool) -> Dict[str, np.ndarray]:
  """The features of rows whose window over `table`'s sorted rows is
  [lows[window], hi): the table's own rows (own=True, in sorted order) or
  query points at times `t`."""
  h, e = spec, spec.entity
  vf = h.value
  n = len(hi)
  exact = vf is None or w.dataset.fields[vf].cents
  if vf is not None:
    value_column = table.column(vf).take(w.order)
    if value_column.null_count:
      raise ValueError(f'history features need {vf} on every record; '
                       f'{value_column.null_count} rows have none')
    values = value_column.to_numpy().astype(np.float64)
  else:
    values = np.zeros(w.n)
  if exact:
    # np.rint rounds half to even, as Python's round(): exact integer cents;
    # a window's sum converts to float exactly while below 2^53 cents.
    cents = np.rint(values * 100).astype(np.int64)
    prefix = np.concatenate([[0], np.cumsum(cents)])
  else:
    # Slow path: math.fsum is exact, but it needs a Python loop per row.
    value_list = value_column.to_pylist()
  # Rates: the share of the window's records whose field has a value.
  hits = {}
  for field, named in h.rates.items():
    column = table.column(field).take(w.order).combine_chunks()
    for name, members in named.items():
      member = pc.is_in(column, value_set=pa.array(list(members),
                                                   column.type))
      hits[(field, name)] = np.concatenate([[0], np.cumsum(
          pc.fill_null(member, False).to_numpy(zero_copy_only=False))])

  features: Dict[str, np.ndarray] = {}
  means = {}
  for window in h.windows:
    lo = lows[window]
    count = hi - lo
    if exact:
      total = (prefix[hi] - prefix[lo]) / 100
    else:
      total = np.array([math.fsum(value_list[a:b])
                        for a, b in zip(lo.tolist(), hi.tolist())],
                       dtype=np.float64)
    mean = means[window] = np.divide(total, count, where=count > 0,
                                     out=np.zeros(n, dtype=np.float64))
    agg = {'count': count, 'sum': total, 'mean': mean}
    if 'max' in h.aggregates:
      agg['max'] = _range_max(values, lo, hi)
    for name in h.aggregates:
      features[f'{e}_{name}_{window}'] = agg[name]
    for (field, name), prefix_hits in hits.items():
      features[f'{e}_{field}_{name}_rate_{window}'] = np.divide(
          prefix_hits[hi] - prefix_hits[lo], count, where=count > 0,
          out=np.zeros(n, dtype=np.float64))

  occurrences = {
      field: _Occurrences(w, table.column(field).take(w.order))
      for field in list(h.distinct) + list(h.novelty)}
  for field, windows in h.distinct.items():
    for window in windows:
      features[f'{e}_distinct_{field}_{window}'] = _first_occurrences(
          occurrences[field].prev, lows[window], hi)
  if own:
    for field, window in h.novelty.items():
      seen = occurrences[field].seen(lows[window], hi)
      features[f'{e}_is_new_{field}_{window}'] = (~seen).astype(np.int64)
    if h.ratio_to_mean:
      mean = means[h.ratio_to_mean]
      features[f'{e}_{vf}_to_mean_{h.ratio_to_mean}'] = np.divide(
          values, mean, where=mean > 0, out=np.ones(n, dtype=np.float64))
  if h.seconds_since_previous:
    lo = lows[max(h.windows, key=h.windows.get)]
    has = hi > lo
    previous = w.t[np.where(has, hi - 1, 0)]
    features[f'{e}_seconds_since_previous'] = np.where(
        has, (t - previous) / MICROS, float(h.horizon))
  if 'hour' in h.calendar:
    features['event_hour'] = (t // MICROS) % 86400 // 3600
  return features


def _as_table(records: Union[pa.Table, pa.RecordBatch], dataset: Dataset
              ) -> pa.Table:
  """The records with the record fields (`dataset.batch_schema()`) in
  their types, and any further columns (side-table columns, an earlier
  entity's features) as they are."""
  schema = dataset.batch_schema()
  if isinstance(records, pa.RecordBatch):
    records = pa.Table.from_batches([records])
  missing = [n for n in schema.names if n not in records.column_names]
  if missing:
    raise ValueError(f'history features need the record fields; missing: '
                     f'{", ".join(missing)}')
  columns = [records.column(f.name).cast(schema.field(f.name).type)
             if f.name in schema.names and f.type != schema.field(
                 f.name).type else records.column(f.name)
             for f in records.schema]
  return pa.Table.from_arrays(columns, names=records.column_names)


def history_table(records: Union[pa.Table, pa.RecordBatch],
                  dataset: Dataset, spec: Optional[HistorySpec] = None
                  ) -> pa.Table:
  """Records of any number of entities -> the same rows with the history
  features of `spec` (default: every declared entity's, one after another).

  `records` has the record fields (`dataset.batch_schema()`: timestamps as
  int64 epoch microseconds), rows in any order, and may carry further
  columns. The result has the rows sorted by (entity, event time, id) of
  the (last) spec, the input columns followed by the spec's features: for
  the record fields alone and every spec, the schema
  `dataset.batch_schema(dataset.feature_types())`.
  """
  table = _as_table(records, dataset)
  for one in ([spec] if spec is not None else dataset.histories):
    order, features = _history_columns(table, dataset, one)
    types = one.feature_types()
    schema = dataset.batch_schema(types)
    columns = list(table.take(pa.array(order)).columns)
    columns += [pa.array(features[name], type=schema.field(name).type)
                for name in types]
    table = pa.Table.from_arrays(columns,
                                 names=table.column_names + list(types))
  return table


def history_features(records: List[dict], dataset: Dataset,
                     spec: Optional[HistorySpec] = None) -> List[dict]:
  """Feature dicts of `records` (dicts with the record fields, timestamps
  as int epoch microseconds), in the order of `records`: `spec`'s features
  (default: the first declared entity's).

  Each result only uses the same entity's records strictly earlier in event
  time, within each declared window; `records` may come in any order.
  """
  if not records:
    return []
  return history_features_of_table(
      pa.Table.from_pylist(records, schema=dataset.batch_schema()), dataset,
      spec)


def history_features_of_table(table: pa.Table, dataset: Dataset,
                              spec: Optional[HistorySpec] = None
                              ) -> List[dict]:
  """`history_features` of records already in a table of the record fields
  (`Dataset.batch_schema`): feature dicts in the order of its rows."""
  if table.num_rows == 0:
    return []
  spec = spec or dataset.history
  order, features = _history_columns(table, dataset, spec)
  names = list(spec.feature_types())
  out = [None] * table.num_rows
  rows = zip(*(features[name].tolist() for name in names))
  for i, values in zip(order.tolist(), rows):
    out[i] = dict(zip(names, values))
  return out


# Batch: RecordBatches, sharded by entity --------------------------------------
def _history_of_shard(shard_and_batches, dataset: Dataset,
                      spec: HistorySpec, max_batch_rows: int
                      ) -> Iterator[pa.RecordBatch]:
  _, batches = shard_and_batches
  batches = list(batches)
  if not batches:
    return
  table = history_table(concat_batches(batches, batches[0].schema), dataset,
                        spec)
  yield from slices(table, max_batch_rows)


class HistoryFeatures(beam.PTransform):
  """PCollection[pa.RecordBatch] valid records -> PCollection[pa.RecordBatch]
  feature rows.

  Input batches have the columns of `dataset.batch_schema()` (no others);
  output batches have `dataset.batch_schema(dataset.feature_types())`: each
  record plus its point-in-time history features, computed from the records
  of the same entity strictly before it in event time. Records are split
  into `num_shards` shards by a hash of the entity; each shard is computed
  at once and leaves in batches of at most `max_batch_rows` rows. The
  result does not depend on `num_shards`.
  """

  def __init__(self, dataset: Dataset, num_shards: int = DEFAULT_SHARDS,
               max_batch_rows: Optional[int] = None):
    super().__init__()
    # None: common.PIECE_ROWS (why it is bounded: see there).
    max_batch_rows = max_batch_rows or common.PIECE_ROWS
    if num_shards < 1 or max_batch_rows < 1:
      raise ValueError(f'num_shards ({num_shards}) and max_batch_rows '
                       f'({max_batch_rows}) must be positive')
    self._dataset = dataset
    self._num_shards, self._max_batch_rows = num_shards, max_batch_rows

  def expand(self, records):
    # One shuffle per declared entity (e.g. user, then item): each shard
    # holds every record of its entities.
    for spec in self._dataset.histories:
      records = (
          records
          | f'SplitRecordsIntoShards[{spec.entity}]' >> beam.FlatMap(
              split_by_shard, spec.entity, self._num_shards)
          | f'GroupBatchesByShard[{spec.entity}]' >> beam.GroupByKey()
          | f'ComputeHistoryOfEachShard[{spec.entity}]' >> beam.FlatMap(
              _history_of_shard, self._dataset, spec, self._max_batch_rows))
    return records


# Streaming: a stateful DoFn per shard of entities -----------------------------
_ROW = '__ready_row'    # the ready rows' own order, through history_table


def _entity_newest(table: pa.Table, entity: str, ts: str) -> np.ndarray:
  """Each row's entity's newest event time in `table`."""
  newest = table.select([entity, ts]).group_by(entity).aggregate(
      [(ts, 'max')])
  at = pc.index_in(table.column(entity).combine_chunks(),
                   value_set=newest.column(entity).combine_chunks())
  return newest.column(f'{ts}_max').combine_chunks().take(at).to_numpy(
      zero_copy_only=False).astype(np.int64)


def features_after(history: Optional[pa.Table], ready: pa.Table,
                   dataset: Dataset, spec: HistorySpec) -> pa.Table:
  """`ready` rows (any columns, at least the record fields) plus `spec`'s
  features, each computed by `history_table` over `history` (record
  fields only) and the ready rows together: the batch definition, run on
  one shard's retained history. Rows keep the order of `ready`."""
  names = dataset.batch_schema().names
  records = ready.select(names).append_column(
      _ROW, pa.array(np.arange(ready.num_rows, dtype=np.int64)))
  if history is not None and history.num_rows:
    # Only the entities of the ready rows: a row's features come from its
    # own entity's events, and the shard's history holds every entity it
    # saw within the retention (computing over all of it made each flush
    # cost the whole history).
    history = history.filter(pc.is_in(
        history.column(spec.entity),
        value_set=pc.unique(ready.column(spec.entity))))
  if history is not None and history.num_rows:
    kept = history.select(names).append_column(
        _ROW, pa.array(np.full(history.num_rows, -1, np.int64)))
    records = pa.concat_tables([kept.cast(records.schema), records])
  out = history_table(records, dataset, spec)
  row = out.column(_ROW).to_numpy()
  mine = np.flatnonzero(row >= 0)
  order = mine[np.argsort(row[mine])]
  types = list(spec.feature_types())
  features = out.select(types).take(pa.array(order))
  return pa.Table.from_arrays(
      list(ready.columns) + list(features.columns),
      names=ready.column_names + types)


# The history is rewritten (pruned) when at least 1 / this of its rows can
# go, else the new rows are appended to it.
_REWRITE_WHEN_DROPPING = 4
# ... or when it holds this many appended pieces: each flush (each batch,
# on arrival) appends one, and every flush reads them all, so without a
# bound a shard's reads cost more with every batch while nothing is old
# enough to prune (the retention is days).
_REWRITE_AT_PIECES = 32


def _read_history(history) -> Optional[pa.Table]:
  """The retained history (BagState of RecordBatches) as one Table, or
  None when empty."""
  batches = [b for b in history.read() if b.num_rows]
  return pa.Table.from_batches(batches) if batches else None


class _ShardHistoryFn(beam.DoFn):
  """(shard of `spec.entity`, RecordBatch of rows) -> RecordBatch of the
  rows plus `spec`'s history features (with `ids_only`: the record id and
  the features alone), in batches, once the watermark has passed their
  event times.

  State per shard, each read and written once per batch or flush: the
  pending batches (BagState: an arriving batch is appended, never read),
  and the retained history, RecordBatches of the record fields of the
  shard's recent events (BagState: a flush appends its rows, so a commit
  carries the new rows, not the whole history). A `flush` timer fires when the watermark passes
  the newest event of the earliest pending batch; the pending rows it has
  passed are then computed at once (`features_after`: `history_table` over
  those rows and the history of their entities, the batch definition) and join the history;
  the rest wait for the next flush. So every event whose time the
  watermark had not passed when it arrived is computed with every earlier
  event of its entity, whatever order they arrived in: its row is batch's.
  The input must come straight from the source's watermark (not from
  another history's flushes, which can lag it): `StatefulHistoryFeatures`
  runs every history on its input, side by side.

  An event that arrives behind the watermark (late: its time already
  flushed) is computed at the next flush against the retained history,
  i.e. with every earlier event of its entity that arrived before it and
  is still retained; rows already emitted are not revised, so a later
  event computed before it arrived does not count it (batch's row would).

  Retention (`retention` = horizon + allowed lateness): a row leaves the
  history once it is `retention` older than its entity's newest event, or
  than the watermark (as far as the shard knows it: the time of the timer
  that fired), whichever comes first; never while a pending row could
  still need it (the cutoff is also `retention` behind the oldest pending
  row). So an event up to the allowed lateness behind the watermark still
  sees its entity's whole horizon, and the state holds the entities seen
  within `retention` of the watermark, not every entity ever seen. A
  flush rewrites the history so pruned when at least a quarter of it can
  go, else appends (rows kept longer change no feature); an `expire` timer, set once per flush at the newest
  retained event + `retention`, empties a shard no flush comes to.

  With `on_arrival`, nothing waits: each batch is computed as it comes,
  with the retained history of its entities, i.e. every event gets every
  earlier event of its entity that arrived before it (or with it). That
  is batch's row when an entity's events arrive in event-time order (the
  input must then keep each entity's order: see `StatefulHistoryFeatures`),
  and the late rule above for one that does not.

  A flush that leaves rows pending sets its timer again, at or behind the
  watermark: it fires in the same watermark step, except when that step
  is the jump to the end of time, after which the DirectRunner fires no
  timer set (ReplayFile therefore ends its stream one step before).
  """
  PENDING = BagStateSpec('pending', PickleCoder())
  HISTORY = BagStateSpec('history', PickleCoder())
  FLUSH_AT = ReadModifyWriteStateSpec('flush_at', PickleCoder())
  FLUSH = TimerSpec('flush', TimeDomain.WATERMARK)
  EXPIRE = TimerSpec('expire', TimeDomain.WATERMARK)

  def __init__(self, dataset: Dataset, spec: HistorySpec,
               allowed_lateness: int, ids_only: bool = False,
               on_arrival: bool = False):
    self._dataset, self._spec = dataset, spec
    self._retention = (spec.horizon + allowed_lateness) * MICROS
    self._ids_only = ids_only
    self._on_arrival = on_arrival

  def process(self, element, pending=beam.DoFn.StateParam(PENDING),
              flush_at=beam.DoFn.StateParam(FLUSH_AT),
              flush=beam.DoFn.TimerParam(FLUSH),
              history=beam.DoFn.StateParam(HISTORY),
              expire=beam.DoFn.TimerParam(EXPIRE)):
    _, batch = element
    if batch.num_rows == 0:
      return None
    if self._on_arrival:
      # No wait: the rows are computed now, with what their entities'
      # history holds; the batch's newest event stands in for the
      # watermark in the retention (an event up to the allowed lateness
      # behind it still sees its whole horizon).
      rows = pa.Table.from_batches([batch])
      newest = pc.max(rows.column(self._dataset.timestamp_field)).as_py()
      return [self._compute(rows, history, expire, newest)]
    pending.add(batch)
    newest = pc.max(batch.column(self._dataset.timestamp_field)).as_py()
    newest = _whole_millis(newest)
    at = flush_at.read()
    if at is None or newest < at:
      flush.set(Timestamp(micros=newest))
      flush_at.write(newest)
    return None

  @on_timer(FLUSH)
  def flush_ready(self, fired=beam.DoFn.TimestampParam,
                  pending=beam.DoFn.StateParam(PENDING),
                  flush_at=beam.DoFn.StateParam(FLUSH_AT),
                  history=beam.DoFn.StateParam(HISTORY),
                  flush=beam.DoFn.TimerParam(FLUSH),
                  expire=beam.DoFn.TimerParam(EXPIRE)):
    now = fired.micros
    batches = list(pending.read())
    pending.clear()
    flush_at.clear()
    if not batches:
      return
    table = concat_batches(batches, batches[0].schema)
    t = table.column(self._dataset.timestamp_field).to_numpy()
    ready = t <= now
    if not ready.all():
      rest = table.filter(pa.array(~ready))
      pending.add(table_to_batch(rest))
      # The watermark is past `now`, maybe past all of the rest: one timer
      # at the newest of them flushes them together.
      last = _whole_millis(int(t[~ready].max()))
      flush.set(Timestamp(micros=last))
      flush_at.write(last)
    if ready.any():
      rows = table.filter(pa.array(ready)) if not ready.all() else table
      # What is still pending is later than `now`: no row it needs is
      # `retention` behind `now`.
      yield self._compute(rows, history, expire, now)

  def _compute(self, rows: pa.Table, history, expire, now: int):
    """`rows` with their history features (`features_after` over the
    retained history of their entities), stamped with their earliest
    event; the rows join the history, pruned as of `now`."""
    kept = _read_history(history)
    out = features_after(kept, rows, self._dataset, self._spec)
    self._keep(history, expire, kept, rows, now)
    if self._ids_only:
      out = out.select([self._dataset.id_field] +
                       list(self._spec.feature_types()))
    earliest = pc.min(rows.column(self._dataset.timestamp_field)).as_py()
    return window.TimestampedValue(table_to_batch(out),
                                   Timestamp(micros=earliest))

  def _keep(self, history, expire, kept: Optional[pa.Table],
            rows: Optional[pa.Table], watermark: int):
    """Writes the history `kept` plus `rows` less what no event can need
    any more (see the class docstring), with `watermark` a lower bound of
    the watermark that no pending row is behind; sets `expire` at the
    newest retained event + `retention`."""
    ts, entity = self._dataset.timestamp_field, self._spec.entity
    table = kept
    added = None
    if rows is not None:
      added = rows.select(self._dataset.batch_schema().names)
      if kept is not None:
        added = added.cast(kept.schema)
      table = added if kept is None else pa.concat_tables([kept, added])
    if table is None:
      return
    t = table.column(ts).to_numpy()
    keep = t >= watermark - self._retention
    if keep.any():
      keep &= t >= _entity_newest(table, entity, ts) - self._retention
    if not keep.any():
      history.clear()
      return
    dropped = len(keep) - int(keep.sum())
    pieces = kept.column(0).num_chunks if kept is not None else 0
    if (dropped * _REWRITE_WHEN_DROPPING >= len(keep)
        or pieces + 1 >= _REWRITE_AT_PIECES):
      history.clear()
      history.add(table_to_batch(table.filter(pa.array(keep))))
    elif added is not None and added.num_rows:
      # Appended: the state commit carries the new rows only. Rows kept
      # past their retention change no feature (they are outside every
      # window of every event still to come, as in batch, which keeps
      # everything); the next rewrite drops them.
      history.add(table_to_batch(added))
    newest = int(t[keep].max())
    expire.set(Timestamp(micros=_whole_millis(
        newest + self._retention + 1)))

  @on_timer(EXPIRE)
  def expire_history(self, fired=beam.DoFn.TimestampParam,
                     pending=beam.DoFn.StateParam(PENDING),
                     history=beam.DoFn.StateParam(HISTORY),
                     expire=beam.DoFn.TimerParam(EXPIRE)):
    kept = _read_history(history)
    if kept is None:
      return
    # Rows still pending (on time when they arrived, waiting for their
    # batch's newest) may be behind the watermark: keep what they need.
    watermark = fired.micros
    waiting = [b for b in pending.read() if b.num_rows]
    if waiting:
      watermark = min(watermark, min(
          pc.min(b.column(self._dataset.timestamp_field)).as_py()
          for b in waiting))
    self._keep(history, expire, kept, None, watermark)


_COPY = '__copy'


def _tag_part(batch: pa.RecordBatch, part: int, id_field: str,
              num_shards: int) -> Iterator[Tuple[int, Tuple[int,
                                                             pa.RecordBatch]]]:
  """(shard of the record id, (which history, rows of that shard))."""
  for shard, rows in split_by_shard(batch, id_field, num_shards):
    yield shard, (part, rows)


def _with_copy(table: pa.Table, id_field: str) -> pa.Table:
  """`table` plus _COPY: the row's rank among the rows of its record id
  (0 but for a repeated id), so that repeats pair up one to one."""
  codes, _ = _dictionary(table.column(id_field))
  order = np.argsort(codes, kind='stable')
  ranked = codes[order]
  first = np.zeros(len(order), dtype=np.int64)
  changed = np.flatnonzero(ranked[1:] != ranked[:-1]) + 1
  first[changed] = changed
  copy = np.empty(len(order), dtype=np.int64)
  copy[order] = np.arange(len(order)) - np.maximum.accumulate(first)
  return table.append_column(_COPY, pa.array(copy))


class _JoinHistoriesFn(beam.DoFn):
  """(shard of record ids, (part k, RecordBatch)) -> RecordBatch of the
  records whose every part has come: part 0's columns (the rows and the
  first history's features), then each further history's features.

  State per shard (read and written once per batch): the rows of each
  part still waiting for another part of their record. Every part holds
  every record once (each history computes every row it receives), so
  nothing waits longer than the slowest history takes to compute it.
  """
  WAITING = ReadModifyWriteStateSpec('waiting', PickleCoder())

  def __init__(self, dataset: Dataset, parts: int):
    self._id, self._ts = dataset.id_field, dataset.timestamp_field
    self._parts = parts

  def process(self, element, waiting=beam.DoFn.StateParam(WAITING)):
    _, (part, batch) = element
    if batch.num_rows == 0:
      return
    tables = waiting.read() or [None] * self._parts
    added = pa.Table.from_batches([batch])
    tables[part] = (added if tables[part] is None else pa.concat_tables(
        [tables[part], added]).combine_chunks())
    if any(t is None for t in tables):
      waiting.write(tables)
      return
    keys = [self._id, _COPY]
    copies = [_with_copy(t, self._id) for t in tables]
    whole = copies[0]
    for other in copies[1:]:
      whole = whole.join(other, keys=keys, join_type='inner',
                         use_threads=False)
    if whole.num_rows == 0:
      waiting.write(tables)
      return
    done = whole.select(keys)
    rest = [t.join(done, keys=keys, join_type='left anti', use_threads=False)
            .drop([_COPY]) for t in copies]
    rest = [t.combine_chunks() if t.num_rows else None for t in rest]
    if all(t is None for t in rest):
      waiting.clear()
    else:
      waiting.write(rest)
    names = tables[0].column_names + [
        n for t in tables[1:] for n in t.column_names if n != self._id]
    out = whole.select(names)
    yield window.TimestampedValue(
        table_to_batch(out),
        Timestamp(micros=pc.min(out.column(self._ts)).as_py()))


def _whole_millis(micros: int) -> int:
  """`micros` rounded up to a whole millisecond: Flink keeps timers in
  milliseconds, so a timer set at ...123456 us fires at ...123000 and the
  rows at ...123456 would never be ready (seen: events stamped to the
  microsecond waited forever). Flushing at the next millisecond is the
  same rule: the watermark has passed every row of the batch."""
  return -(-micros // 1000) * 1000


class StatefulHistoryFeatures(beam.PTransform):
  """PCollection[pa.RecordBatch] valid records (or rows with further
  columns: side-table columns) -> PCollection[pa.RecordBatch] feature rows.

  The streaming twin of `HistoryFeatures`: each row is the input row plus
  `Dataset.history_feature_types()`, from the same `history_table`. Each
  declared entity's history (e.g. user and item) runs on the input
  itself, side by side: rows travel as (shard of the entity, RecordBatch)
  pairs (`num_shards` shards) to a stateful DoFn per shard
  (`_ShardHistoryFn`): a row is computed once the watermark passes the
  newest event of the batch it came in, with every earlier event of its
  entity, so on-time events in any arrival order give batch's rows, for
  every history, whatever the parallelism. (Chained, a second history
  would get rows only when the first flushed them, after its watermark
  had passed them, and could compute a later row of an item before an
  earlier one arrived.) With two or more histories, the parts of each
  record meet again in a stateful join per shard of record ids
  (`_JoinHistoriesFn`). What a late event gets: see `_ShardHistoryFn`.

  `on_arrival`: rows are computed as they arrive instead (no wait for
  the watermark; `_ShardHistoryFn`), so a row's features count the earlier
  events of its entity that arrived before it: batch's row when each
  entity's events arrive in event-time order. A runner's channels keep
  their order, so that holds when every step before this one is keyed by
  the entity (or not keyed), as pipelines.streaming arranges for the first
  history; a further history's entity (an item) gets its events from
  several shards of the first and may see them out of order.
  """

  def __init__(self, dataset: Dataset, allowed_lateness: int = 0,
               num_shards: int = 8, on_arrival: bool = False):
    super().__init__()
    self._dataset, self._lateness = dataset, allowed_lateness
    self._shards = num_shards
    self._on_arrival = on_arrival

  def expand(self, rows):
    specs = self._dataset.histories
    parts = []
    for part, spec in enumerate(specs):
      e = spec.entity
      parts.append(
          rows
          | f'ShardBy[{e}]' >> beam.FlatMap(
              split_by_shard, e, self._shards).with_output_types(
                  Tuple[int, pa.RecordBatch])
          | (f'ComputeOnArrival[{e}]' if self._on_arrival else
             f'ComputeWhenTheWatermarkPasses[{e}]') >> beam.ParDo(
                 _ShardHistoryFn(self._dataset, spec, self._lateness,
                                 ids_only=part > 0,
                                 on_arrival=self._on_arrival)))
    if len(parts) == 1:
      return parts[0]
    id_field = self._dataset.id_field
    return (
        [part_rows | f'ShardByRecordId[{spec.entity}]' >> beam.FlatMap(
            _tag_part, part, id_field, self._shards).with_output_types(
                Tuple[int, Tuple[int, pa.RecordBatch]])
         for part, (spec, part_rows) in enumerate(zip(specs, parts))]
        | 'AllHistoriesOfEachRecord' >> beam.Flatten()
        | 'JoinTheHistoriesOfEachRecord' >> beam.ParDo(
            _JoinHistoriesFn(self._dataset, len(parts))))
