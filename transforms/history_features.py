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
  * streaming, `StatefulHistoryFeatures`: PCollection[dict] ->
    PCollection[dict], a stateful DoFn per entity holding the entity's
    recent records; each event waits for the watermark, then its features
    are `history_features` of the entity's earlier events. With on-time
    events (in any arrival order) both forms give equal rows.
"""

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
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
from transforms.common import (DEFAULT_SHARDS, MICROS, concat_batches, slices,
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
  spec = spec or dataset.history
  table = pa.Table.from_pylist(records, schema=dataset.batch_schema())
  order, features = _history_columns(table, dataset, spec)
  names = list(spec.feature_types())
  out = [None] * len(records)
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
               max_batch_rows: int = 65536):
    super().__init__()
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


# Streaming: one stateful DoFn per entity --------------------------------------
class _EventHistory:
  """`spec`'s features of one event from its entity's kept history, in
  plain Python: the per-event form of `_features` (own=True), equal to
  `history_features(history + [event])[-1]` bit for bit, in O(kept rows)
  per event without building Arrow tables.

  History rows are tuples (event time, value, *fields): only what the
  features read (`fields`: the distinct, novelty and rate fields).
  """

  def __init__(self, dataset: Dataset, spec: HistorySpec):
    self._spec, self._ts, self._vf = spec, dataset.timestamp_field, spec.value
    self._exact = spec.value is None or dataset.fields[spec.value].cents
    self._fields = tuple(dict.fromkeys(
        list(spec.distinct) + list(spec.novelty) + list(spec.rates)))
    self._at = {f: 2 + i for i, f in enumerate(self._fields)}
    self._types = spec.feature_types()
    self._longest = max(spec.windows, key=spec.windows.get)
    self._rates = {(field, name): frozenset(members)
                   for field, named in spec.rates.items()
                   for name, members in named.items()}

  def row(self, record: Dict[str, Any]) -> tuple:
    value = 0.0 if self._vf is None else float(record[self._vf])
    return (record[self._ts], value) + tuple(
        _as_key(record[f]) for f in self._fields)

  def features(self, history: List[tuple], event: tuple) -> Dict[str, Any]:
    h, e, t = self._spec, self._spec.entity, event[0]
    earlier = [r for r in history if r[0] < t]      # ties excluded
    out: Dict[str, Any] = {}
    members, means = {}, {}
    for window, seconds in h.windows.items():
      since = t - seconds * MICROS
      rows = members[window] = [r for r in earlier if r[0] >= since]
      count = len(rows)
      if self._exact:
        # round() as np.rint: half to even, exact integer cents.
        total = sum(round(r[1] * 100) for r in rows) / 100
      else:
        total = math.fsum(r[1] for r in rows)
      mean = means[window] = total / count if count > 0 else 0.0
      agg = {'count': count, 'sum': total, 'mean': mean}
      if 'max' in h.aggregates:
        agg['max'] = max(r[1] for r in rows) if rows else 0.0
      for name in h.aggregates:
        out[f'{e}_{name}_{window}'] = agg[name]
      for (field, name), values in self._rates.items():
        at = self._at[field]
        hits = sum(1 for r in rows if r[at] is not None and r[at] in values)
        out[f'{e}_{field}_{name}_rate_{window}'] = (
            hits / count if count > 0 else 0.0)
    for field, windows in h.distinct.items():
      at = self._at[field]
      for window in windows:
        out[f'{e}_distinct_{field}_{window}'] = len(
            {r[at] for r in members[window]})
    for field, window in h.novelty.items():
      at = self._at[field]
      out[f'{e}_is_new_{field}_{window}'] = int(
          all(r[at] != event[at] for r in members[window]))
    if h.ratio_to_mean:
      mean = means[h.ratio_to_mean]
      out[f'{e}_{self._vf}_to_mean_{h.ratio_to_mean}'] = (
          event[1] / mean if mean > 0 else 1.0)
    if h.seconds_since_previous:
      rows = members[self._longest]
      out[f'{e}_seconds_since_previous'] = (
          (t - max(r[0] for r in rows)) / MICROS if rows
          else float(h.horizon))
    if 'hour' in h.calendar:
      out['event_hour'] = (t // MICROS) % 86400 // 3600
    return {name: out[name] for name in self._types}


def _as_key(value):
  """A field value as `_dictionary` compares values: -0.0 is 0.0."""
  return value + 0.0 if isinstance(value, float) else value


class _HistoryFn(beam.DoFn):
  """(entity, record) -> record + history features, one per event, in the
  entity's event-time order.

  An arriving event waits in state until the watermark passes its event
  time (a `flush` timer), so every earlier event that is on time has
  arrived by then, whatever order the runner's shuffles delivered them in
  (the dedupe shuffle on Flink at parallelism 2 does reorder). Events are
  then computed in event-time order, so rows equal batch rows exactly for
  all on-time events. A late event (behind the watermark when it arrives)
  is computed at the next flush, against the history kept at that point.

  State: the pending events, and the entity's history rows
  (`_EventHistory.row`: event time, value and the fields the features read)
  of the last `retention` = horizon + allowed lateness before its newest
  event. Each event's features are those of `history_features(history +
  [event])`: kept rows strictly earlier in event time, within each window
  (`_EventHistory.features`, without Arrow). A timer clears the history
  once the watermark is `retention` past the entity's newest event (no
  on-time event can need it any more).
  """
  HISTORY = BagStateSpec('history', PickleCoder())
  PENDING = BagStateSpec('pending', PickleCoder())
  FLUSH_AT = ReadModifyWriteStateSpec('flush_at', VarIntCoder())
  NEWEST = ReadModifyWriteStateSpec('newest', VarIntCoder())
  FLUSH = TimerSpec('flush', TimeDomain.WATERMARK)
  EXPIRE = TimerSpec('expire', TimeDomain.WATERMARK)

  def __init__(self, dataset: Dataset, allowed_lateness: int):
    self._dataset = dataset
    self._retention = (dataset.history.horizon + allowed_lateness) * MICROS
    self._events = None

  def setup(self):
    self._events = _EventHistory(self._dataset, self._dataset.history)

  def process(self, element, pending=beam.DoFn.StateParam(PENDING),
              flush_at=beam.DoFn.StateParam(FLUSH_AT),
              flush=beam.DoFn.TimerParam(FLUSH)):
    _, record = element
    t = record[self._dataset.timestamp_field]
    pending.add((t, record))
    at = flush_at.read()
    # One timer per entity: the earliest time a flush can happen. A later
    # event waits for the flush after it (see flush_ready).
    if at is None or t < at:
      flush.set(Timestamp(micros=t))
      flush_at.write(t)

  @on_timer(FLUSH)
  def flush_ready(self, fired=beam.DoFn.TimestampParam,
                  pending=beam.DoFn.StateParam(PENDING),
                  flush_at=beam.DoFn.StateParam(FLUSH_AT),
                  history=beam.DoFn.StateParam(HISTORY),
                  newest=beam.DoFn.StateParam(NEWEST),
                  flush=beam.DoFn.TimerParam(FLUSH),
                  expire=beam.DoFn.TimerParam(EXPIRE)):
    if self._events is None:  # called without setup() (tests)
      self.setup()
    now = fired.micros
    waiting = sorted(pending.read(), key=lambda e: e[0])
    ready = [e for e in waiting if e[0] <= now]
    rest = waiting[len(ready):]
    pending.clear()
    flush_at.clear()
    if rest:
      for e in rest:
        pending.add(e)
      # The watermark is past `now`, maybe past all of `rest`: one timer at
      # the latest of them flushes them together (a timer per event would
      # cost a firing per event).
      last = rest[-1][0]
      flush.set(Timestamp(micros=last))
      flush_at.write(last)
    yield from self._compute(ready, history, newest, expire)

  def _compute(self, ready, history, newest, expire):
    """Features of `ready` (event-time order), each against the history
    kept as of that event, as if the events had arrived one by one."""
    previous = latest = newest.read()
    kept = list(history.read())
    cutoff = None
    for t, record in ready:
      latest = t if latest is None else max(t, latest)
      if latest - self._retention != cutoff:
        cutoff = latest - self._retention
        # Filtering by the cutoff (not by what happens to be stored) keeps
        # the result independent of when the bag was last compacted.
        kept = [r for r in kept if r[0] >= cutoff]
      event = self._events.row(record)
      features = self._events.features(kept, event)
      if t >= cutoff:
        kept.append(event)
      row = dict(record)
      row.update(features)
      yield window.TimestampedValue(row, Timestamp(micros=t))
    history.clear()
    for r in kept:
      history.add(r)
    if latest is not None:
      if latest != previous:
        newest.write(latest)
      expire.set(Timestamp(micros=latest + self._retention + 1))

  @on_timer(EXPIRE)
  def expire_history(self, fired=beam.DoFn.TimestampParam,
                     history=beam.DoFn.StateParam(HISTORY),
                     newest=beam.DoFn.StateParam(NEWEST),
                     pending=beam.DoFn.StateParam(PENDING)):
    latest = newest.read()
    # A timer set before a later event moved the expiry on can still fire
    # in the same watermark step (the runner took it before the flush that
    # reset it ran); and events still waiting may need the history: their
    # flush sets the expiry again.
    if latest is not None and latest + self._retention >= fired.micros:
      return
    if any(True for _ in pending.read()):
      return
    history.clear()
    newest.clear()


class StatefulHistoryFeatures(beam.PTransform):
  """PCollection[dict] valid records -> PCollection[dict] feature rows.

  The streaming twin of `HistoryFeatures`: each row is the record plus
  `Dataset.history_feature_types()`, from the same `history_features`. An
  event is computed once the watermark passes its event time, in the
  entity's event-time order, so on-time events give rows equal to batch
  rows whatever order they arrived in; a row leaves up to one watermark
  step after its event. A late event (behind the watermark on arrival)
  misses the earlier-in-time records that arrive after it, and one more
  than `allowed_lateness` behind its entity's newest event may also miss
  records older than its longest window that were already expired.
  """

  def __init__(self, dataset: Dataset, allowed_lateness: int = 0):
    super().__init__()
    self._dataset, self._lateness = dataset, allowed_lateness

  def expand(self, records):
    entity = self._dataset.entity_field
    return (records
            | 'KeyByEntity' >> beam.Map(
                lambda r: (r[entity], r)).with_output_types(
                    Tuple[str, Dict[str, Any]])
            | 'ComputeHistoryOfEachEvent' >> beam.ParDo(
                _HistoryFn(self._dataset, self._lateness)))
