"""Windowed entity aggregates: per key and per event-time window.

Two forms, one row shape (`aggregate_columns`, the columns of
`Dataset.aggregate_schema(key_field)`):

  * `EntityAggregates` (batch): PCollection[pa.RecordBatch] of valid
    records (`Dataset.batch_schema()`, event times int64 epoch micros) ->
    PCollection[pa.RecordBatch] of aggregate rows. Each batch is summed per
    (key, time slot) with Arrow first, so Beam's windowing and combine see
    one element per batch and slot, not one per record.
  * `StreamingEntityAggregates`: PCollection[pa.RecordBatch] valid records
    (stamped with their earliest event time) -> {'aggregates':
    PCollection[pa.RecordBatch] rows plus pane and pane_index, 'late':
    PCollection[pa.RecordBatch] dead-letter rows}. Batches travel by shard
    of the key; the lateness rule below runs per shard, then the same
    partial sums as batch are windowed with early, on-time and late
    panes.

Both give the same values for the same records, for each value field v the
declaration lists (`aggregates.values`, default the history value):
total_<v> = the sum (of exact integer cents, round half to even, when v is
declared `cents`; else of floats, added in a fixed order) and mean_<v> =
total_<v> / count; for a binary label, <label>_rate = positives / labelled
(None without labelled records).

Lateness (streaming), in one place. Let L be the allowed lateness and, for
an event at event time t, first_end(t) the end of the earliest aggregate
window that contains t. Per shard of aggregate keys, a *lateness clock* is
kept: the time of the shard's last fired lateness timer (an event-time
timer set at first_end + L of each admitted event; it fires only once the
watermark has passed it), i.e. a lower bound of the watermark. An event is late, and
dead-lettered with error_kind 'late', when

    first_end(t) + L <= clock(key)

i.e. when even its earliest window has been closed for longer than L by the
watermark, as Beam's own lateness rule (Beam's, not the key's own newest
event: an event that arrives after later events of its key, as a parallel
runner's shuffles deliver them, is on time as long as the watermark allows,
and is aggregated as batch would). Late events are never aggregated (not
even into their later windows); every admitted event is aggregated in all
of its windows. Lateness is per aggregate table (an event may be late for
its merchant's table and not for its user's), and late events still get
history features and a score.

The gap: a shard's clock learns the watermark only from the shard's own
timers, so it can be behind it (a shard's first event, or one long after
the shard's previous events). Such an event, if it arrives after the watermark passed
first_end + L, passes the rule and is then dropped by the runner's lateness
check at the window's GroupByKey (Beam has no late-data output), not
dead-lettered. tests/test_streaming.py pins this case down. With in-order
replay no event is ever late.
"""

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.coders import PickleCoder
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming

from schemas.dataset import Dataset
from transforms.common import (MICROS, Counters, concat_batches,
                               dead_letter_batch, dead_letter_row, json_row,
                               micros_to_rfc3339, pieces, split_by_shard,
                               table_to_batch)

AGGREGATES = 'aggregates'
LATE = 'late'

# The partial sums of a (key, slot) or (key, window), after the key: see
# `sum_types`.
# A combine accumulator is compacted (its partials summed into one) once it
# holds this many: memory stays bounded by the distinct keys of a window.
COMPACT_AT = 64


def window_fn(size: int, period: Optional[int] = None) -> window.WindowFn:
  """Sliding windows of `size` seconds every `period`; fixed when the
  period is None or equal to the size."""
  if period is None or period == size:
    return window.FixedWindows(size)
  return window.SlidingWindows(size, period)


def sum_types(dataset: Dataset) -> Dict[str, pa.DataType]:
  """The partial sums, name -> type: count; sum_<v> of each declared value
  field (int64 cents when the field is `cents`, else float64); labelled and
  positives for a binary label."""
  out = {'count': pa.int64()}
  for value in dataset.aggregate_values:
    out[f'sum_{value}'] = (pa.int64() if dataset.fields[value].cents
                           else pa.float64())
  if dataset.task == 'binary':
    out['labelled'] = pa.int64()
    out['positives'] = pa.int64()
  return out


def aggregate_columns(dataset: Dataset, key_field: str, keys: pa.Array,
                      w: window.BoundedWindow, sums: Dict[str, Any]
                      ) -> Dict[str, pa.Array]:
  """Column name -> values of the aggregate rows of window `w`, one row per
  key, from the partial sums (`sum_types`) of each key: the one place the
  row shape is written, for both forms.

  Same values as Python scalar arithmetic: int64 -> float64 is exact below
  2**53, and IEEE division is correctly rounded, like Python's.
  """
  count = np.asarray(sums['count'], dtype=np.int64)
  rows = len(count)
  columns = {
      key_field: keys,
      'window_start': pa.array([micros_to_rfc3339(w.start.micros)] * rows,
                               pa.string()),
      'window_end': pa.array([micros_to_rfc3339(w.end.micros)] * rows,
                             pa.string()),
      'count': pa.array(count),
  }
  for value in dataset.aggregate_values:
    total = np.asarray(sums[f'sum_{value}'])
    if dataset.fields[value].cents:
      total = total.astype(np.int64) / 100
    total = total.astype(np.float64)
    columns[f'total_{value}'] = pa.array(total)
    columns[f'mean_{value}'] = pa.array(total / count)
  if dataset.task == 'binary':
    labelled = np.asarray(sums['labelled'], dtype=np.int64)
    positives = np.asarray(sums['positives'], dtype=np.int64)
    has_labels = labelled > 0
    rate = np.divide(positives, labelled, out=np.zeros(rows),
                     where=has_labels)
    columns[f'{dataset.label_field}_rate'] = pa.array(rate, mask=~has_labels)
  return columns


# Batch: RecordBatches --------------------------------------------------------
def partial_schema(dataset: Dataset, key_field: str) -> pa.Schema:
  """Columns of a partial: the key and the sums (`sum_types`)."""
  key_type = dataset.batch_schema().field(key_field).type
  return pa.schema([(key_field, key_type)] +
                   list(sum_types(dataset).items()))


def partial_sums(batch: pa.RecordBatch, dataset: Dataset, key_field: str,
                 slot: int) -> Iterator[Tuple[int, pa.RecordBatch]]:
  """(slot start, partial sums per key) for every slot of `slot` micros
  that holds a record of `batch`; a slot starts at t - t % slot.

  Cents are np.rint(value * 100): round half to even, as Python's round.
  A record is labelled when its label is not null, positive when its class
  index is 1.
  """
  if batch.num_rows == 0:
    return
  t = batch.column(dataset.timestamp_field).to_numpy()
  types = sum_types(dataset)
  columns = {key_field: batch.column(key_field),
             '_slot': t - t % slot,    # NumPy's % is a floor modulo, like Beam's
             'count': np.ones(batch.num_rows, dtype=np.int64)}
  for value in dataset.aggregate_values:
    values = batch.column(value).to_numpy(zero_copy_only=False).astype(
        np.float64)
    columns[f'sum_{value}'] = (np.rint(values * 100).astype(np.int64)
                               if dataset.fields[value].cents else values)
  if 'labelled' in types:
    label = dataset.label_field
    if batch.schema.get_field_index(label) >= 0:
      index = dataset.label_index(batch.column(label))
      labelled = index.is_valid().to_numpy(zero_copy_only=False)
      positives = pc.fill_null(pc.equal(index, 1), False).to_numpy(
          zero_copy_only=False)
    else:
      labelled = positives = np.zeros(batch.num_rows, dtype=bool)
    columns['labelled'] = labelled.astype(np.int64)
    columns['positives'] = positives.astype(np.int64)
  records = pa.table(columns)
  summed = (records.group_by([key_field, '_slot'])
            .aggregate([(s, 'sum') for s in types])
            .sort_by([('_slot', 'ascending'), (key_field, 'ascending')]))
  partials = table_to_batch(pa.table(
      [summed[key_field]] + [summed[f'{s}_sum'] for s in types],
      names=[key_field, *types]))
  slots = summed['_slot'].to_numpy()
  starts = np.concatenate([[0], np.flatnonzero(np.diff(slots)) + 1])
  ends = np.concatenate([starts[1:], [len(slots)]])
  for start, end in zip(starts, ends):
    # take, not slice: a pickled slice carries its parent's whole buffers.
    yield int(slots[start]), partials.take(np.arange(start, end))


def sum_partials(partials: List[pa.RecordBatch],
                 schema: pa.Schema) -> pa.RecordBatch:
  """Partials (any number, keys repeating) -> one partial, a row per key,
  sorted by key."""
  key, sums = schema.names[0], schema.names[1:]
  # Sorted first: float sums then add in one order, whatever order the
  # partials arrived in (the same output on every run).
  table = concat_batches(partials, schema).sort_by(
      [(n, 'ascending') for n in schema.names])
  summed = table.group_by(key).aggregate(
      [(s, 'sum') for s in sums])
  return table_to_batch(pa.table(
      [summed[key]] + [summed[f'{s}_sum'] for s in sums],
      schema=schema).sort_by(key))


class SumPartials(beam.CombineFn):
  """RecordBatch partials (`partial_schema`) -> their sums per key.

  The accumulator is a list of partials, compacted into one whenever it
  reaches COMPACT_AT (and before it is shuffled), so it never holds more
  than COMPACT_AT partials.
  """

  def __init__(self, schema: pa.Schema):
    self._schema = schema

  def create_accumulator(self):
    return []

  def add_input(self, accumulator, partial):
    accumulator.append(partial)
    if len(accumulator) >= COMPACT_AT:
      return self.compact(accumulator)
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = [partial for acc in accumulators for partial in acc]
    if len(merged) >= COMPACT_AT:
      return self.compact(merged)
    return merged

  def compact(self, accumulator):
    if len(accumulator) <= 1:
      return accumulator
    return [sum_partials(accumulator, self._schema)]

  def extract_output(self, accumulator):
    return sum_partials(accumulator, self._schema)


def _stamped_partials(batch: pa.RecordBatch, dataset: Dataset, key_field: str,
                      slot: int):
  """RecordBatch -> (key_field, partial) per slot, stamped at its start.
  One table key (the key field's name): a window's partials meet in one
  combine."""
  for start, partial in partial_sums(batch, dataset, key_field, slot):
    yield window.TimestampedValue((key_field, partial),
                                  Timestamp(micros=start))


class _PartialsToRows(beam.DoFn):
  """(table key, summed partial) in a window -> RecordBatch of its rows."""

  def __init__(self, dataset: Dataset, key_field: str):
    self._dataset, self._key_field = dataset, key_field
    self._schema = dataset.aggregate_schema(key_field)

  def process(self, element, w=beam.DoFn.WindowParam):
    _, sums = element
    columns = aggregate_columns(
        self._dataset, self._key_field, sums.column(self._key_field), w,
        {s: sums.column(s).to_numpy() for s in sums.schema.names[1:]})
    # A window holds every key seen in it: more keys with more input.
    yield from pieces(pa.RecordBatch.from_arrays(
        [columns[f.name] for f in self._schema], schema=self._schema))


class EntityAggregates(beam.PTransform):
  """PCollection[pa.RecordBatch] valid records (`Dataset.batch_schema()`) ->
  PCollection[pa.RecordBatch] aggregate rows
  (`Dataset.aggregate_schema(key_field)`), one batch per window.

  Rows: key, window_start, window_end (RFC 3339), count, total_<v> and
  mean_<v> per value field, <label>_rate (binary label; null without
  labels): `Dataset.aggregate_schema(key_field)`, one per key and event-time
  window. Windows are sliding (`size`, every `period` seconds) or fixed
  when `period` equals `size` or is None.

  Each batch is first summed per (key, slot) with Arrow; a partial per
  (batch, slot) is stamped with its slot's start and windowed by Beam, and
  the partials of a window are summed by `SumPartials`. Slots are
  gcd(size, period) long, so every window boundary is a slot boundary: a
  window holds a slot whole or not at all, and a partial stamped at its
  slot start falls in exactly the windows of its records (for fixed windows
  and the usual sliding windows, whose size is a multiple of the period,
  the slot is the period).
  """

  def __init__(self, dataset: Dataset, key_field: str, size: int,
               period: Optional[int] = None):
    super().__init__()
    self._dataset = dataset
    self._key_field = key_field
    self._size, self._period = size, period or size

  def windowing(self) -> window.WindowFn:
    return window_fn(self._size, self._period)

  def expand(self, batches):
    dataset, key = self._dataset, self._key_field
    slot = math.gcd(self._size, self._period) * MICROS
    return (
        batches
        | 'SumEachBatchPerKeyAndSlot' >> beam.FlatMap(
            _stamped_partials, dataset, key, slot).with_output_types(
                Tuple[str, pa.RecordBatch])
        # A partial stamped at its slot's start is in exactly the windows of
        # its records: window starts and ends are multiples of the slot.
        | 'WindowBySlotStart' >> beam.WindowInto(self.windowing())
        | 'SumPartialsPerWindow' >> beam.CombinePerKey(
            SumPartials(partial_schema(dataset, key)))
        | 'ToRows' >> beam.ParDo(_PartialsToRows(dataset, key))
        | 'BackToGlobalWindow' >> beam.WindowInto(window.GlobalWindows()))


# Streaming: RecordBatches per shard of keys ----------------------------------
def first_window_end(t: np.ndarray, size: int, period: int) -> np.ndarray:
  """The end (micros) of the earliest window of `size` every `period`
  seconds (starts at multiples of the period, as `window_fn`'s) that holds
  each event time: its start is the first multiple of the period after
  t - size."""
  size, period = size * MICROS, period * MICROS
  return ((t - size) // period + 1) * period + size


def late_row(record: Dict[str, Any], dataset: Dataset, key_field: str,
             message: str) -> Dict[str, Any]:
  """A dead-letter row for a valid record refused by an aggregate table.

  `raw` is the record as JSON with its event time in RFC 3339, ready to
  re-ingest.
  """
  ts = dataset.timestamp_field
  raw = dict(record)
  raw[ts] = micros_to_rfc3339(record[ts])
  return dead_letter_row(None, None, LATE, key_field, message, json_row(raw))


class _RouteLate(beam.DoFn):
  """(shard, RecordBatch) -> (shard, partial sums of the admitted rows) per
  slot, stamped at the slot's start (`_shard_partials`), and a dead-letter
  RecordBatch (LATE) of the rows the lateness rule of this module's
  docstring refuses.

  Per shard of keys, in the global window (so the runner drops nothing
  before this decision), read and written once per batch. State: the
  shard's clock and the distinct deadlines (first window end + L) of its
  admitted rows whose timers have not fired yet; the timer is set at the
  earliest of them.
  """
  CLOCK = ReadModifyWriteStateSpec('clock', PickleCoder())
  DEADLINES = ReadModifyWriteStateSpec('deadlines', PickleCoder())
  CLOSE = TimerSpec('close', TimeDomain.WATERMARK)

  def __init__(self, dataset: Dataset, key_field: str, size: int,
               period: int, allowed_lateness: int):
    self._dataset, self._key_field = dataset, key_field
    self._size, self._period = size, period
    self._lateness = allowed_lateness * MICROS
    self._slot = math.gcd(size, period) * MICROS

  def setup(self):
    self._counters = Counters()

  def process(self, element, clock=beam.DoFn.StateParam(CLOCK),
              deadlines=beam.DoFn.StateParam(DEADLINES),
              close=beam.DoFn.TimerParam(CLOSE)):
    shard, batch = element
    t = batch.column(self._dataset.timestamp_field).to_numpy()
    first_end = first_window_end(t, self._size, self._period)
    deadline = first_end + self._lateness
    now = clock.read()
    late = (deadline <= now) if now is not None else np.zeros(len(t), bool)
    if late.any():
      yield beam.pvalue.TaggedOutput(LATE, self._late_rows(
          batch, np.flatnonzero(late), first_end, deadline, now))
      batch = batch.filter(pa.array(~late))
      deadline = deadline[~late]
    if not batch.num_rows:
      return
    pending = sorted(set(deadlines.read() or ()) | set(
        np.unique(deadline).tolist()))
    deadlines.write(pending)
    close.set(Timestamp(micros=pending[0]))
    # The admitted rows' partial sums, each stamped at its slot's start
    # (one step less: the DirectRunner charges each step of each bundle).
    yield from _shard_partials((shard, batch), self._dataset,
                               self._key_field, self._slot)

  def _late_rows(self, batch, rows, first_end, deadline, now):
    """Dead-letter rows of the late rows (few: built one by one)."""
    self._counters.inc('records_late', len(rows))
    self._counters.inc(f'dead_letter.{LATE}', len(rows))
    key, ts = self._key_field, self._dataset.timestamp_field
    out = []
    for i, record in zip(rows, batch.take(pa.array(rows)).to_pylist()):
      out.append(late_row(
          record, self._dataset, key,
          f'{key} {record[key]}: event at {micros_to_rfc3339(record[ts])} '
          f'is late: its first window ended '
          f'{micros_to_rfc3339(int(first_end[i]))}, + allowed lateness '
          f'{self._lateness // MICROS}s = '
          f'{micros_to_rfc3339(int(deadline[i]))}, not after the watermark '
          f'{micros_to_rfc3339(now)}'))
    return dead_letter_batch(out)

  @on_timer(CLOSE)
  def watermark_passed(self, fired=beam.DoFn.TimestampParam,
                       clock=beam.DoFn.StateParam(CLOCK),
                       deadlines=beam.DoFn.StateParam(DEADLINES),
                       close=beam.DoFn.TimerParam(CLOSE)):
    # The watermark has passed `fired`: a lower bound the shard's rows use.
    now = clock.read()
    if now is None or fired.micros > now:
      clock.write(fired.micros)
    pending = [d for d in deadlines.read() or () if d > fired.micros]
    if pending:
      deadlines.write(pending)
      close.set(Timestamp(micros=pending[0]))
    else:
      deadlines.clear()


def _shard_partials(shard_and_batch, dataset: Dataset, key_field: str,
                    slot: int):
  """(shard, RecordBatch) -> (shard, partial) per slot, stamped at the
  slot's start (in exactly the windows of its rows)."""
  shard, batch = shard_and_batch
  for start, partial in partial_sums(batch, dataset, key_field, slot):
    yield window.TimestampedValue((shard, partial), Timestamp(micros=start))


class _ToPaneRows(beam.DoFn):
  """(shard, summed partial) in a window and pane -> RecordBatch of its
  aggregate rows plus pane ('EARLY', 'ON_TIME', 'LATE') and pane_index."""

  def __init__(self, dataset: Dataset, key_field: str):
    self._dataset, self._key_field = dataset, key_field
    self._schema = dataset.aggregate_schema(key_field)

  def process(self, element, w=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    _, sums = element
    if sums.num_rows == 0:
      # A pane of no records says nothing (batch has no such row). Beam's
      # Python SDK asks for on-time panes even when empty (FIRE_ALWAYS).
      return
    columns = aggregate_columns(
        self._dataset, self._key_field, sums.column(self._key_field), w,
        {s: sums.column(s).to_numpy() for s in sums.schema.names[1:]})
    n = sums.num_rows
    arrays = [columns[f.name] for f in self._schema] + [
        pa.array([PaneInfoTiming.to_string(pane.timing)] * n, pa.string()),
        pa.array(np.full(n, pane.index, np.int64))]
    yield pa.RecordBatch.from_arrays(
        arrays, schema=self._schema.append(pa.field('pane', pa.string()))
        .append(pa.field('pane_index', pa.int64())))


class StreamingEntityAggregates(beam.PTransform):
  """PCollection[pa.RecordBatch] valid records (`Dataset.batch_schema()`)
  -> {'aggregates': PCollection[pa.RecordBatch], 'late':
  PCollection[pa.RecordBatch]}.

  'aggregates': `EntityAggregates`' rows plus pane and pane_index, left
  in their event-time window. Rows travel as (shard of the key,
  RecordBatch) pairs (`num_shards` shards): the lateness rule of this
  module's docstring runs per shard (`_RouteLate`), then each batch is
  summed per (key, slot) with Arrow (`partial_sums`, as batch), and the
  partials of a shard and window are summed by `SumPartials`. Windows are
  sliding (`size` every `period` seconds; fixed when equal). Panes, per
  shard and window: early every `early_firing` seconds of processing time
  while a window is open, on time when the watermark passes its end, then
  one late pane per late batch for `allowed_lateness` seconds; panes
  accumulate, and each holds a row for every key of the shard in the
  window: a key's row with the highest pane_index is its current total.
  'late': dead-letter rows (error_kind 'late') of the refused rows.
  Counter: records_late.
  """

  def __init__(self, dataset: Dataset, key_field: str, size: int,
               period: Optional[int] = None, allowed_lateness: int = 3600,
               early_firing: int = 60, num_shards: int = 8):
    super().__init__()
    self._dataset, self._key_field = dataset, key_field
    self._size, self._period = size, period or size
    self._lateness, self._early = allowed_lateness, early_firing
    self._shards = num_shards

  def windowfn(self) -> window.WindowFn:
    return window_fn(self._size, self._period)

  def expand(self, batches):
    key, dataset = self._key_field, self._dataset
    routed = (
        batches
        | 'ShardByKey' >> beam.FlatMap(
            split_by_shard, key, self._shards).with_output_types(
                Tuple[int, pa.RecordBatch])
        | 'RouteLateEventsAndSumPerSlot' >> beam.ParDo(_RouteLate(
            dataset, key, self._size, self._period,
            self._lateness)).with_outputs(LATE, main=AGGREGATES))
    rows = (
        routed[AGGREGATES]
        | 'WindowBySlotStart' >> beam.WindowInto(
            self.windowfn(),
            trigger=trigger.AfterWatermark(
                early=trigger.AfterProcessingTime(self._early),
                late=trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=Duration(seconds=self._lateness))
        | 'SumPartialsPerShardAndWindow' >> beam.CombinePerKey(
            SumPartials(partial_schema(dataset, key)))
        | 'ToRows' >> beam.ParDo(_ToPaneRows(dataset, key)))
    return {AGGREGATES: rows, LATE: routed[LATE]}
