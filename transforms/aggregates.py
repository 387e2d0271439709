"""Windowed entity aggregates: per key and per event-time window."""

from typing import Optional

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from schemas.dataset import Dataset
from transforms.parse import micros_to_rfc3339


class AggregateAmounts(beam.CombineFn):
  """(amount, label or None) -> count, total, labelled and fraud counts."""

  def create_accumulator(self):
    return (0, 0, 0, 0)     # count, total in cents, labelled, positives

  def add_input(self, acc, element):
    amount, label = element
    count, cents, labelled, positives = acc
    return (count + 1, cents + round(amount * 100),
            labelled + (label is not None), positives + (label == 1))

  def merge_accumulators(self, accumulators):
    return tuple(sum(parts) for parts in zip(*accumulators))

  def extract_output(self, acc):
    return acc


class AggregateRow(beam.DoFn):

  def __init__(self, key_field: str):
    self._key_field = key_field

  def process(self, element, w=beam.DoFn.WindowParam):
    key, (count, cents, labelled, positives) = element
    total = cents / 100
    yield {
        self._key_field: key,
        'window_start': micros_to_rfc3339(w.start.micros),
        'window_end': micros_to_rfc3339(w.end.micros),
        'count': count,
        'total_amount': total,
        'mean_amount': total / count,
        'fraud_rate': positives / labelled if labelled else None,
    }


class EntityAggregates(beam.PTransform):
  """PCollection[dict] valid records -> PCollection[dict] aggregate rows.

  Rows: {<key_field>, window_start, window_end (RFC 3339), count,
  total_amount, mean_amount, fraud_rate (None without labels)}, one per key
  and event-time window. Windows are sliding (`size`, every `period`
  seconds) or fixed when `period` equals `size` or is None. The records'
  own event time is their timestamp, so batch and streaming window alike.
  """

  def __init__(self, dataset: Dataset, key_field: str, size: int,
               period: Optional[int] = None):
    super().__init__()
    self._dataset = dataset
    self._key_field = key_field
    self._size, self._period = size, period or size

  def windowing(self):
    if self._period == self._size:
      return window.FixedWindows(self._size)
    return window.SlidingWindows(self._size, self._period)

  def expand(self, records):
    ts, key = self._dataset.timestamp_field, self._key_field
    value = self._dataset.history.value
    label = self._dataset.label_field
    return (
        records
        | 'StampEventTime' >> beam.Map(
            lambda r: window.TimestampedValue(r, Timestamp(micros=r[ts])))
        | 'WindowByEventTime' >> beam.WindowInto(self.windowing())
        | 'KeyAndValue' >> beam.Map(
            lambda r: (r[key], (r[value], r.get(label) if label else None)))
        | 'AggregatePerKeyAndWindow' >> beam.CombinePerKey(AggregateAmounts())
        | 'ToRow' >> beam.ParDo(AggregateRow(key))
        | 'BackToGlobalWindow' >> beam.WindowInto(window.GlobalWindows()))
