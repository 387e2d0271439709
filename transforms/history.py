"""Point-in-time history features per entity (e.g. per user).

For a record at event time t, a window of length w covers the same entity's
records with  t - w <= t_j < t : strictly before t, so records that share
the exact event time never see each other (ties are excluded in both
directions), and a record exactly w old is still inside the window.
Which windows and aggregates exist is declared in the dataset's `history:`
section; `history_features` computes them for one entity's records and is
shared by the batch transform and the streaming stateful DoFn.

Sums of a `cents` field are exact integer sums of cents, so every result is
independent of the order in which records were added or expired.
"""

import collections
import datetime
import math
from typing import Dict, List, Sequence

import apache_beam as beam

from schemas.dataset import Dataset

_MICROS = 1_000_000


def _window_names(dataset: Dataset):
  """Feature names per window, built once (the declaration drives them)."""
  e, h = dataset.entity_field, dataset.history
  return {
      w: {agg: f'{e}_{agg}_{w}' for agg in h.aggregates}
      for w in h.windows
  }


class _Window:
  """Records of one entity with t - w <= t_j < t, maintained incrementally."""

  def __init__(self, seconds: int, tracked: Sequence[str]):
    self.length = seconds * _MICROS
    self.lo = 0
    self.hi = 0
    self.max_deque = collections.deque()   # indices, values decreasing
    self.counts = {f: collections.Counter() for f in tracked}

  def advance(self, records, times, values, t):
    while self.hi < len(records) and times[self.hi] < t:
      v = values[self.hi]
      while self.max_deque and values[self.max_deque[-1]] <= v:
        self.max_deque.pop()
      self.max_deque.append(self.hi)
      for f, counter in self.counts.items():
        counter[records[self.hi][f]] += 1
      self.hi += 1
    while self.lo < self.hi and times[self.lo] < t - self.length:
      if self.max_deque and self.max_deque[0] == self.lo:
        self.max_deque.popleft()
      for f, counter in self.counts.items():
        key = records[self.lo][f]
        counter[key] -= 1
        if not counter[key]:
          del counter[key]
      self.lo += 1


def history_features(records: List[dict], dataset: Dataset) -> List[dict]:
  """Feature dicts for one entity's records, in the order of `records`.

  `records` may come in any order; each result only uses records strictly
  earlier in event time, within each declared window.
  """
  h = dataset.history
  ts, vf, e = dataset.timestamp_field, h.value, dataset.entity_field
  cents = dataset.fields[vf].cents
  order = sorted(range(len(records)),
                 key=lambda i: (records[i][ts], records[i][dataset.id_field]))
  ordered = [records[i] for i in order]
  times = [r[ts] for r in ordered]
  values = [r[vf] for r in ordered]
  prefix = [0]
  if cents:
    for v in values:
      prefix.append(prefix[-1] + round(v * 100))

  tracked = {w: set() for w in h.windows}
  for field, windows in h.distinct.items():
    for w in windows:
      tracked[w].add(field)
  for field, w in h.novelty.items():
    tracked[w].add(field)
  windows = {w: _Window(s, sorted(tracked[w])) for w, s in h.windows.items()}
  names = _window_names(dataset)
  longest = max(h.windows, key=h.windows.get)
  ratio_name = f'{e}_{vf}_to_mean_{h.ratio_to_mean}'

  out = [None] * len(records)
  for k, record in enumerate(ordered):
    t = times[k]
    features = {}
    means = {}
    for w, window in windows.items():
      window.advance(ordered, times, values, t)
      n = window.hi - window.lo
      if cents:
        total = (prefix[window.hi] - prefix[window.lo]) / 100
      else:
        total = math.fsum(values[window.lo:window.hi])
      means[w] = total / n if n else 0.0
      agg = {'count': n, 'sum': total, 'mean': means[w],
             'max': values[window.max_deque[0]] if n else 0.0}
      for name_of, name in names[w].items():
        features[name] = agg[name_of]
    for field, ws in h.distinct.items():
      for w in ws:
        features[f'{e}_distinct_{field}_{w}'] = len(windows[w].counts[field])
    for field, w in h.novelty.items():
      features[f'{e}_is_new_{field}_{w}'] = int(
          record[field] not in windows[w].counts[field])
    if h.ratio_to_mean:
      mean = means[h.ratio_to_mean]
      features[ratio_name] = record[vf] / mean if mean > 0 else 1.0
    if h.seconds_since_previous:
      window = windows[longest]
      features[f'{e}_seconds_since_previous'] = (
          (t - times[window.hi - 1]) / _MICROS if window.hi > window.lo
          else float(h.horizon))
    if 'hour' in h.calendar:
      features['event_hour'] = datetime.datetime.fromtimestamp(
          t // _MICROS, datetime.timezone.utc).hour
    out[order[k]] = features
  return out


def _features_of_entity(entity_and_records, dataset: Dataset):
  _, records = entity_and_records
  records = list(records)
  for record, features in zip(records, history_features(records, dataset)):
    row = dict(record)
    row.update(features)
    yield row


class HistoryFeatures(beam.PTransform):
  """PCollection[dict] valid records -> PCollection[dict] feature rows.

  Each output row is the input record plus its point-in-time history
  features (`Dataset.history_feature_types()`), computed from the records of
  the same entity strictly before it in event time.
  """

  def __init__(self, dataset: Dataset):
    super().__init__()
    self._dataset = dataset

  def expand(self, records):
    entity = self._dataset.entity_field
    return (records
            | 'KeyByEntity' >> beam.Map(lambda r: (r[entity], r))
            | 'GroupByEntity' >> beam.GroupByKey()
            | 'ComputeHistory' >> beam.FlatMap(_features_of_entity,
                                               self._dataset))
