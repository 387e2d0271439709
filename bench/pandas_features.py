"""The history features in one process with pandas/NumPy: a peer and a check.

    python -m bench.pandas_features --input tx.jsonl [--compare OUT/features]
        [--output features.parquet] [--json]

Computes exactly the point-in-time features of transforms/history.py, from
the same declaration (`schemas.dataset.load_dataset`): for a record of an
entity at event time t, a window of length w covers that entity's records
with  t - w <= t_j < t  (records sharing the exact event time never see each
other), and sums of a `cents` field are exact integer sums of cents.

Everything is vectorised and exact:
  * rows are sorted by (entity, event time, id); every window is an index
    range [lo, hi) of that order, found with one `searchsorted` on an int64
    key (entity code, dense rank of the event time) — no float arithmetic
    on times, so ties and the closed lower bound are exact;
  * count = hi - lo; sum = prefix sum of integer cents; mean = sum / count;
  * max = a sparse table (range-maximum query) over the sorted values;
  * distinct values in a window = rows j in [lo, hi) whose previous
    occurrence of the same (entity, value) lies before lo, counted over the
    expanded (row, window member) pairs, in chunks;
  * "is new" = the last earlier occurrence of (entity, value) strictly
    before t is older than t - w (or absent), by `searchsorted` on a
    (entity, value, time rank) key;
  * seconds since previous = t minus the time of row hi - 1 of the longest
    window, capped at the horizon when the window is empty.

It does not validate records (the benchmark files are clean) and reads JSON
lines or CSV with pyarrow. `compare` checks its table against the
pipeline's features Parquet: exact for ints and strings, 1e-9 relative for
floats.
"""

import argparse
import glob
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from schemas.dataset import Dataset, load_dataset

_MICROS = 1_000_000
_PAIR_CHUNK = 4_000_000   # (row, window member) pairs expanded at a time


# Reading ---------------------------------------------------------------------
def _arrow_types(dataset: Dataset) -> pa.Schema:
  types = {'string': pa.string(), 'float': pa.float64(), 'int': pa.int64(),
           'timestamp': pa.string()}   # parsed below, RFC 3339 with a zone
  return pa.schema([(n, types[f.type]) for n, f in dataset.fields.items()])


def read_records(path: str, dataset: Dataset) -> pd.DataFrame:
  """A JSON lines or CSV file of clean records -> DataFrame; timestamps as
  int64 epoch microseconds (what the pipeline carries)."""
  import pyarrow.csv as pcsv
  import pyarrow.json as pjson
  schema = _arrow_types(dataset)
  base = path[:-3] if path.endswith('.gz') else path
  if base.endswith('.csv'):
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
        column_types=schema, strings_can_be_null=True))
  else:
    table = pjson.read_json(path, parse_options=pjson.ParseOptions(
        explicit_schema=schema, unexpected_field_behavior='ignore'))
  columns = {}
  for name, field in dataset.fields.items():
    column = table.column(name)
    if field.type == 'timestamp':
      column = pc.cast(column, pa.timestamp('us', tz='UTC')).cast(pa.int64())
    columns[name] = column
  return pa.table(columns).to_pandas()


# Exact index arithmetic --------------------------------------------------------
class _Sorted:
  """Rows in (entity, time, id) order and the int64 keys for searchsorted."""

  def __init__(self, df: pd.DataFrame, dataset: Dataset):
    e, ts, idf = dataset.entity_field, dataset.timestamp_field, dataset.id_field
    entity, _ = pd.factorize(df[e], sort=True)
    ids, _ = pd.factorize(df[idf], sort=True)
    times = df[ts].to_numpy(dtype=np.int64)
    self.order = np.lexsort((ids, times, entity))
    self.entity = entity[self.order].astype(np.int64)
    self.t = times[self.order]
    self.unique_t = np.unique(self.t)
    self.rank = np.searchsorted(self.unique_t, self.t)   # dense time rank
    self.m = np.int64(len(self.unique_t) + 1)
    if len(self.unique_t) and (self.entity.max() + 1) * int(self.m) >= 2**62:
      raise OverflowError('entity x time rank does not fit an int64 key')
    self.key = self.entity * self.m + self.rank           # non-decreasing
    self.n = len(self.t)
    # hi: first row of the same entity with t_j >= t (ties excluded).
    self.hi = np.searchsorted(self.key, self.key, side='left')

  def lower(self, seconds: int) -> np.ndarray:
    """lo: first row of the same entity with t_j >= t - w."""
    lo_rank = np.searchsorted(self.unique_t, self.t - seconds * _MICROS,
                              side='left')
    return np.searchsorted(self.key, self.entity * self.m + lo_rank,
                           side='left')


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               empty: float = 0.0) -> np.ndarray:
  """max(values[lo:hi]) per row (a sparse table), `empty` where lo == hi."""
  n = hi - lo
  out = np.full(len(lo), empty, dtype=np.float64)
  longest = int(n.max()) if len(n) else 0
  if longest == 0:
    return out
  levels = longest.bit_length()          # table levels 0 .. levels-1
  level = np.zeros(len(n), dtype=np.int64)
  for k in range(1, levels):
    level += n >= (1 << k)
  table = values.astype(np.float64)
  pad = np.full(1 << max(levels - 1, 0), -np.inf)
  for k in range(levels):
    if k:
      half = 1 << (k - 1)
      table = np.maximum(table, np.concatenate([table[half:], pad[:half]]))
    rows = np.flatnonzero((level == k) & (n > 0))
    if len(rows):
      span = 1 << k
      out[rows] = np.maximum(table[lo[rows]], table[hi[rows] - span])
  return out


def _previous_same(entity: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Index (in sorted order) of the previous row with the same (entity,
  value), -1 if none."""
  group, _ = pd.factorize(entity * (np.int64(codes.max()) + 1) + codes)
  by_group = np.argsort(group, kind='stable')   # within a group: row order
  prev = np.full(len(codes), -1, dtype=np.int64)
  same = group[by_group[1:]] == group[by_group[:-1]]
  prev[by_group[1:][same]] = by_group[:-1][same]
  return prev


def _distinct_in_window(prev: np.ndarray, lo: np.ndarray,
                        hi: np.ndarray) -> np.ndarray:
  """Distinct values among rows [lo, hi): the rows whose previous
  occurrence of the same value lies before lo."""
  n = len(lo)
  out = np.zeros(n, dtype=np.int64)
  counts = hi - lo
  ends = np.cumsum(counts)
  start = 0
  while start < n:
    base = ends[start - 1] if start else 0
    stop = int(np.searchsorted(ends, base + _PAIR_CHUNK, side='right'))
    stop = max(stop, start + 1)
    c = counts[start:stop]
    total = int(c.sum())
    if total:
      row = np.repeat(np.arange(start, stop), c)
      first = np.repeat(ends[start:stop] - c - base, c)
      member = lo[row] + (np.arange(total) - first)
      fresh = prev[member] < lo[row]
      out[start:stop] = np.bincount(row - start, weights=fresh,
                                    minlength=stop - start).astype(np.int64)
    start = stop
  return out


def _seen_in_window(s: _Sorted, codes: np.ndarray, seconds: int
                    ) -> np.ndarray:
  """True where the same (entity, value) occurred at t - w <= t_j < t."""
  group, _ = pd.factorize(s.entity * (np.int64(codes.max()) + 1) + codes)
  group = group.astype(np.int64)
  key = group * s.m + s.rank
  order = np.argsort(key, kind='stable')
  sorted_key = key[order]
  pos = np.searchsorted(sorted_key, key, side='left') - 1   # last t_j < t
  found = pos >= 0
  pos = np.where(found, pos, 0)
  last = order[pos]
  found &= group[last] == group
  found &= s.t[last] >= s.t - seconds * _MICROS
  return found


# The features ------------------------------------------------------------------
def history_features(df: pd.DataFrame, dataset: Dataset) -> pd.DataFrame:
  """Feature columns (`dataset.history_feature_types()`), aligned with df."""
  h, e = dataset.history, dataset.entity_field
  vf = h.value
  if not dataset.fields[vf].cents:
    raise NotImplementedError('exact sums are implemented for cents fields')
  s = _Sorted(df, dataset)
  values = df[vf].to_numpy(dtype=np.float64)[s.order]
  cents = np.round(values * 100).astype(np.int64)   # round half even = round()
  prefix = np.concatenate([[0], np.cumsum(cents)])
  feats: Dict[str, np.ndarray] = {}
  lows, means = {}, {}
  for w, seconds in h.windows.items():
    lo = s.lower(seconds)
    lows[w] = lo
    n = s.hi - lo
    total = (prefix[s.hi] - prefix[lo]) / 100
    with np.errstate(invalid='ignore', divide='ignore'):
      mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
    means[w] = mean
    agg = {'count': n.astype(np.int64), 'sum': total, 'mean': mean}
    if 'max' in h.aggregates:
      agg['max'] = _range_max(values, lo, s.hi)
    for name in h.aggregates:
      feats[f'{e}_{name}_{w}'] = agg[name]
  codes = {}
  for field in set(h.distinct) | set(h.novelty):
    c, _ = pd.factorize(df[field].to_numpy()[s.order])
    codes[field] = c.astype(np.int64)
  for field, windows in h.distinct.items():
    prev = _previous_same(s.entity, codes[field])
    for w in windows:
      feats[f'{e}_distinct_{field}_{w}'] = _distinct_in_window(
          prev, lows[w], s.hi)
  for field, w in h.novelty.items():
    seen = _seen_in_window(s, codes[field], h.windows[w])
    feats[f'{e}_is_new_{field}_{w}'] = (~seen).astype(np.int64)
  if h.ratio_to_mean:
    mean = means[h.ratio_to_mean]
    with np.errstate(invalid='ignore', divide='ignore'):
      feats[f'{e}_{vf}_to_mean_{h.ratio_to_mean}'] = np.where(
          mean > 0, values / np.where(mean > 0, mean, 1.0), 1.0)
  if h.seconds_since_previous:
    longest = max(h.windows, key=h.windows.get)
    lo = lows[longest]
    has = s.hi > lo
    prev_t = s.t[np.where(has, s.hi - 1, 0)]
    feats[f'{e}_seconds_since_previous'] = np.where(
        has, (s.t - prev_t) / _MICROS, float(h.horizon))
  if 'hour' in h.calendar:
    feats['event_hour'] = (s.t // _MICROS // 3600) % 24
  unsorted = {}
  for name, kind in dataset.history_feature_types().items():
    column = np.empty(s.n, dtype=np.int64 if kind == 'int' else np.float64)
    column[s.order] = feats[name]
    unsorted[name] = column
  return pd.DataFrame(unsorted, index=df.index)


def feature_table(df: pd.DataFrame, dataset: Dataset) -> pd.DataFrame:
  """Records plus their history features: the pipeline's gold table."""
  return pd.concat([df, history_features(df, dataset)], axis=1)


# Comparison with the pipeline's output -----------------------------------------
def read_pipeline_features(features_dir: str) -> pd.DataFrame:
  import pyarrow.parquet as pq
  files = sorted(glob.glob(os.path.join(features_dir, '*.parquet')))
  if not files:
    raise FileNotFoundError(f'no Parquet files under {features_dir}')
  table = pa.concat_tables([pq.read_table(f) for f in files])
  columns = [c.cast(pa.int64()) if pa.types.is_timestamp(c.type) else c
             for c in table.columns]
  return pa.Table.from_arrays(columns, names=table.column_names).to_pandas()


def compare(ours: pd.DataFrame, pipeline: pd.DataFrame, dataset: Dataset,
            rtol: float = 1e-9) -> Tuple[bool, List[str]]:
  """(equal, problems): row sets by id, ints/strings exact, floats rtol."""
  idf = dataset.id_field
  problems = []
  a = ours.sort_values(idf, kind='stable').reset_index(drop=True)
  b = pipeline.sort_values(idf, kind='stable').reset_index(drop=True)
  if len(a) != len(b) or not (a[idf].to_numpy() == b[idf].to_numpy()).all():
    missing = len(set(a[idf]) - set(b[idf]))
    extra = len(set(b[idf]) - set(a[idf]))
    return False, [f'row sets differ: {len(a)} vs {len(b)} rows, '
                   f'{missing} only here, {extra} only in the pipeline']
  for name, kind in dataset.feature_types().items():
    if name not in b:
      problems.append(f'{name}: not in the pipeline output')
      continue
    x, y = a[name], b[name]
    nulls = x.isna().to_numpy() != y.isna().to_numpy()
    both = ~(x.isna().to_numpy() | y.isna().to_numpy())
    if kind == 'float':
      xv = x.to_numpy(dtype=np.float64)[both]
      yv = y.to_numpy(dtype=np.float64)[both]
      bad = ~((xv == yv) | (np.abs(xv - yv) <= rtol * np.maximum(
          np.abs(xv), np.abs(yv))))
    else:
      xv, yv = x.to_numpy()[both], y.to_numpy()[both]
      bad = xv != yv
    wrong = int(bad.sum()) + int(nulls.sum())
    if wrong:
      rows = np.flatnonzero(both)[np.flatnonzero(bad)[:3]]
      examples = ', '.join(
          f'{a[idf].iloc[r]}: {x.iloc[r]!r} vs {y.iloc[r]!r}' for r in rows)
      problems.append(f'{name}: {wrong} rows differ ({examples})')
  return not problems, problems


# Command line ------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='bench.pandas_features',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--input', required=True, help='JSON lines or CSV file')
  p.add_argument('--schema', default='transactions')
  p.add_argument('--compare', default=None,
                 help="the pipeline's features/ folder to check against")
  p.add_argument('--output', default=None, help='write the table (Parquet)')
  p.add_argument('--json', action='store_true',
                 help='print one JSON object (timings, check) on stdout')
  args = p.parse_args(argv)
  dataset = load_dataset(args.schema)
  began = time.perf_counter()
  df = read_records(args.input, dataset)
  read_s = time.perf_counter() - began
  mark = time.perf_counter()
  table = feature_table(df, dataset)
  features_s = time.perf_counter() - mark
  write_s = 0.0
  if args.output:
    import pyarrow.parquet as pq
    mark = time.perf_counter()
    frame = table.copy()
    ts = dataset.timestamp_field
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    arrow = arrow.set_column(
        arrow.schema.get_field_index(ts), ts,
        arrow.column(ts).cast(pa.timestamp('us', tz='UTC')))
    pq.write_table(arrow, args.output)
    write_s = time.perf_counter() - mark
  result = {'rows': len(table), 'read_s': read_s, 'features_s': features_s,
            'write_s': write_s,
            'total_s': time.perf_counter() - began}
  if args.compare:
    mark = time.perf_counter()
    ok, problems = compare(table, read_pipeline_features(args.compare),
                           dataset)
    result.update(check='OK' if ok else 'MISMATCH', problems=problems[:20],
                  compare_s=time.perf_counter() - mark)
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f'{k}: {v}')
  return 0 if result.get('check', 'OK') == 'OK' else 1


if __name__ == '__main__':
  sys.exit(main())
