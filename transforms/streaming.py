"""Streaming: sources, parsing, stateful history features, windowed aggregates.

The streaming pipeline (pipelines.streaming) reuses the batch definitions:
records are validated by the same `RecordValidator` (through parse's
`ValidateRecords`, with its counters), history features come from the same
`transforms.history.history_features`, aggregates from the same
`AggregateAmounts`. What differs is only what a stream needs:

  * `ReadPubSubRecords` / `ReplayFile`: PBegin -> PCollection[RawRecord]
    stamped with event time (the replay) or publish time (Pub/Sub);
  * `StreamingParseAndValidate`: like `ParseAndValidate`, but duplicates are
    dropped by a stateful DoFn keyed by id (the batch GroupByKey cannot run
    on an unbounded input in the global window with the default trigger);
  * `StatefulHistoryFeatures`: a stateful DoFn per entity holding the
    entity's recent records;
  * `StreamingEntityAggregates`: event-time windows with early, on-time and
    late panes, and a dead-letter output for events that are too late;
  * `WriteJsonLinesPanes`: JSON lines files cut by processing time.

Lateness, in one place. Let L be the allowed lateness and, for an event at
event time t, first_end(t) the end of the earliest aggregate window that
contains t. Per aggregate key, a *lateness clock* is kept: the larger of the
latest event time of the key's admitted events and the time of the key's
last fired lateness timer (an event-time timer set at first_end + L of each
admitted event; it fires only once the watermark has passed it). An event is
late, and dead-lettered with error_kind 'late', when

    first_end(t) + L <= clock(key)

i.e. when even its earliest window has been closed for longer than L, by the
key's own progress or by the watermark. Late events are never aggregated
(not even into their later windows); every admitted event is aggregated in
all of its windows. Lateness is per aggregate table (an event may be late
for its merchant's table and not for its user's), and late events still get
history features and a score.

The gap: a key's clock learns the watermark only from the key's own timers,
so it can be behind it (a key's first event, or one long after the key's
previous events). Such an event, if it arrives after the watermark passed
first_end + L, passes the rule and is then dropped by the runner's lateness
check at the window's GroupByKey (Beam has no late-data output), not
dead-lettered. tests/test_streaming.py pins this case down. With in-order
replay no event is ever late.
"""

import dataclasses
import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec,
                                              ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming

from schemas.dataset import Dataset
from transforms.aggregates import AggregateAmounts, AggregateRow
from transforms.history import history_features
from transforms.parse import (DEAD_LETTER, NAMESPACE, VALID,
                              ParseAndValidate, RecordError, RecordValidator,
                              dead_letter_row, micros_to_rfc3339)
from transforms.read import RawRecord, check_input, read_file

AGGREGATES = 'aggregates'
LATE = 'late'
_MICROS = 1_000_000


def _stamp(element, micros: int):
  return window.TimestampedValue(element, Timestamp(micros=micros))


def _json_row(row: Dict[str, Any]) -> str:
  return json.dumps(row, sort_keys=True, default=str)


# Sources ---------------------------------------------------------------------
def decode_message(data: bytes, source: str) -> RawRecord:
  """One Pub/Sub message (a JSON object) -> RawRecord; never raises.

  Messages have no position in a stream, so `position` is -1. The error
  texts are those of the JSON lines reader.
  """
  text = data.decode('utf-8', errors='replace').strip()
  try:
    values = json.loads(text)
  except ValueError as e:
    return RawRecord(source, -1, text, None, f'not valid JSON: {e}')
  if not isinstance(values, dict):
    return RawRecord(source, -1, text, None, 'a JSON line must be an object')
  return RawRecord(source, -1, text, values)


class ReadPubSubRecords(beam.PTransform):
  """PBegin -> PCollection[RawRecord] from a Pub/Sub subscription or topic.

  Each message is one JSON record. Elements carry the publish time, or the
  `timestamp_attribute` when publishers set one (then the watermark follows
  event time); StreamingParseAndValidate re-stamps valid records with their
  event time either way.
  """

  def __init__(self, subscription: Optional[str] = None,
               topic: Optional[str] = None,
               timestamp_attribute: Optional[str] = None):
    super().__init__()
    if bool(subscription) == bool(topic):
      raise ValueError('give exactly one of subscription or topic')
    self._subscription, self._topic = subscription, topic
    self._timestamp_attribute = timestamp_attribute

  def expand(self, pbegin):
    source = f'pubsub:{self._subscription or self._topic}'
    return (pbegin
            | 'ReadMessages' >> beam.io.ReadFromPubSub(
                subscription=self._subscription, topic=self._topic,
                timestamp_attribute=self._timestamp_attribute,
                with_attributes=False)
            | 'DecodeMessages' >> beam.Map(decode_message, source))


def _time_only_validator(dataset: Dataset) -> RecordValidator:
  """A validator of the timestamp field alone: the same coercion as the
  parser, to order a replay without validating every record twice."""
  ts = dataset.timestamp_field
  return RecordValidator(dataclasses.replace(
      dataset, fields={ts: dataset.fields[ts]}, rules=()))


def replay_order(raws: Iterable[RawRecord],
                 dataset: Dataset) -> List[Tuple[int, RawRecord]]:
  """(event time in micros, record) in event-time order (then file order).

  A record whose event time cannot be read (it will be dead-lettered) takes
  the time of the readable record before it in the file, or the first
  readable time, so it travels with its neighbours and is never late.
  """
  validator, ts = _time_only_validator(dataset), dataset.timestamp_field
  timed = []
  for raw in raws:
    try:
      timed.append((validator.validate(raw)[ts], raw))
    except RecordError:
      timed.append((None, raw))
  known = [t for t, _ in timed if t is not None]
  previous = known[0] if known else 0
  ordered = []
  for t, raw in timed:
    previous = previous if t is None else t
    ordered.append((previous, raw))
  ordered.sort(key=lambda item: (item[0], item[1].source, item[1].position))
  return ordered


class ReplayFile(beam.PTransform):
  """PBegin -> PCollection[RawRecord] (unbounded), a file replayed as a stream.

  The files matched by `pattern` are read with the batch readers when the
  pipeline is built, ordered by event time (`replay_order`) and emitted
  through a TestStream, `batch` records at a time, each stamped with its
  event time; after each batch the watermark advances to the batch's last
  event time. So windows close, panes fire and timers run as they would on
  a live, in-order stream. This is a DirectRunner source for local runs and
  tests; production streams read Pub/Sub.

  `speed` paces the runner's processing-time clock: before each batch it
  advances by (event time since the previous batch) / speed seconds, so with
  speed=3600 an hour of events is one second of processing time and
  processing-time triggers (early panes, file cuts) fire as they would live.
  The DirectRunner's test clock is simulated: a replay never sleeps. Without
  speed processing time stands still and only watermark panes fire.
  """

  def __init__(self, pattern: str, dataset: Dataset,
               input_format: Optional[str] = None,
               speed: Optional[float] = None, batch: int = 1000):
    super().__init__()
    if speed is not None and speed <= 0:
      raise ValueError(f'replay speed must be positive, got {speed}')
    self._pattern, self._format = pattern, input_format
    self._dataset, self._speed, self._batch = dataset, speed, max(1, batch)
    self.replayed = None   # records emitted, known once the stream is built

  def test_stream(self) -> TestStream:
    raws = [raw for path in check_input(self._pattern, self._format)
            for raw in read_file(path, self._format)]
    events = replay_order(raws, self._dataset)
    self.replayed = len(events)
    # Pickled, not FastPrimitivesCoder: RawRecord must come back a RawRecord.
    stream = TestStream(coder=PickleCoder())
    watermark = previous = None
    for start in range(0, len(events), self._batch):
      chunk = events[start:start + self._batch]
      last = chunk[-1][0]
      if self._speed and previous is not None and last > previous:
        stream.advance_processing_time(
            (last - previous) / _MICROS / self._speed)
      stream.add_elements([_stamp(raw, t) for t, raw in chunk])
      # TestStream keeps watermarks (and element times) in milliseconds.
      mark = last - last % 1000
      if watermark is None or mark > watermark:
        stream.advance_watermark_to(Timestamp(micros=mark))
        watermark = mark
      previous = last
    return stream.advance_watermark_to_infinity()

  def expand(self, pbegin):
    return pbegin | 'EmitInEventTimeOrder' >> self.test_stream()


# Parse and validate ----------------------------------------------------------
class _FirstCopyWins(beam.DoFn):
  """(id, (RawRecord, record)) -> record; later copies -> dead letter.

  In a stream the first copy to arrive wins. An id is remembered until the
  watermark passes its event time + `horizon`; a copy arriving after that
  is not recognised as a duplicate.
  """
  FIRST = ReadModifyWriteStateSpec('first', PickleCoder())
  FORGET = TimerSpec('forget', TimeDomain.WATERMARK)

  def __init__(self, horizon_seconds: int):
    self._horizon = Duration(seconds=horizon_seconds)

  def process(self, element, timestamp=beam.DoFn.TimestampParam,
              first=beam.DoFn.StateParam(FIRST),
              forget=beam.DoFn.TimerParam(FORGET)):
    record_id, (raw, record) = element
    seen = first.read()
    if seen is None:
      first.write((raw.source, raw.position))
      forget.set(timestamp + self._horizon)
      yield record
      return
    yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter_row(
        raw, 'duplicate', None,
        f'id {record_id} already read at {seen[0]}:{seen[1]}'))

  @on_timer(FORGET)
  def forget_id(self, first=beam.DoFn.StateParam(FIRST)):
    first.clear()


class DropDuplicatesWithinHorizon(beam.PTransform):
  """PCollection[(id, (RawRecord, dict))] -> {'valid', 'dead_letter'}, for
  unbounded input: the first copy to arrive wins (batch: the first in file
  order), within `horizon_seconds` of event time. Valid records leave
  stamped with their event time."""

  def __init__(self, dataset: Dataset, horizon_seconds: int):
    super().__init__()
    self._ts, self._horizon = dataset.timestamp_field, horizon_seconds

  def expand(self, keyed):
    ts = self._ts
    return (keyed
            | 'StampEventTime' >> beam.Map(
                lambda kv: _stamp(kv, kv[1][1][ts])).with_output_types(
                    Tuple[str, Any])
            | 'DropLaterCopies' >> beam.ParDo(
                _FirstCopyWins(self._horizon)).with_outputs(
                    DEAD_LETTER, main=VALID))


def StreamingParseAndValidate(dataset: Dataset, dedupe_horizon: int = 86400,
                              reference_micros: Optional[int] = None):
  """The batch `ParseAndValidate` (same validator, dead-letter rows and
  counters) with the streaming dedupe step."""
  return ParseAndValidate(
      dataset, reference_micros,
      dedupe=DropDuplicatesWithinHorizon(dataset, dedupe_horizon))


# History features ------------------------------------------------------------
class _HistoryFn(beam.DoFn):
  """(entity, record) -> record + history features, one per event.

  State: the entity's records of the last `retention` = horizon + allowed
  lateness (before its newest event). Each event's features are
  `history_features(history + [event])` at the event: records that arrived
  before it and are strictly earlier in event time, within each window.
  A timer clears the state once the watermark is `retention` past the
  entity's newest event (no on-time event can need it any more).
  """
  HISTORY = BagStateSpec('history', PickleCoder())
  NEWEST = ReadModifyWriteStateSpec('newest', VarIntCoder())
  EXPIRE = TimerSpec('expire', TimeDomain.WATERMARK)

  def __init__(self, dataset: Dataset, allowed_lateness: int):
    self._dataset = dataset
    self._retention = (dataset.history.horizon + allowed_lateness) * _MICROS

  def process(self, element, history=beam.DoFn.StateParam(HISTORY),
              newest=beam.DoFn.StateParam(NEWEST),
              expire=beam.DoFn.TimerParam(EXPIRE)):
    _, record = element
    ts = self._dataset.timestamp_field
    t = record[ts]
    previous = newest.read()
    latest = t if previous is None else max(t, previous)
    cutoff = latest - self._retention
    stored = list(history.read())
    # Filtering by the cutoff (not by what happens to be stored) keeps the
    # result independent of when the bag was last compacted.
    kept = [r for r in stored if r[ts] >= cutoff]
    features = history_features(kept + [record], self._dataset)[-1]
    if len(stored) > 2 * len(kept):
      # Compact once most of the bag is stale: amortised O(1) per event.
      history.clear()
      for r in kept:
        history.add(r)
    if t >= cutoff:
      history.add(record)
    if latest != previous:
      newest.write(latest)
      expire.set(Timestamp(micros=latest + self._retention + 1))
    row = dict(record)
    row.update(features)
    yield row

  @on_timer(EXPIRE)
  def expire_history(self, history=beam.DoFn.StateParam(HISTORY),
                     newest=beam.DoFn.StateParam(NEWEST)):
    history.clear()
    newest.clear()


class StatefulHistoryFeatures(beam.PTransform):
  """PCollection[dict] valid records -> PCollection[dict] feature rows.

  The streaming twin of `HistoryFeatures`: each row is the record plus
  `Dataset.history_feature_types()`, from the same `history_features`. An
  event only sees the history that arrived before it: with in-order events
  (a replay) the rows equal batch rows exactly; an out-of-order event misses
  the earlier-in-time records that arrive after it, and one more than
  `allowed_lateness` behind its entity's newest event may also miss records
  older than its longest window that were already expired.
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
            | 'ComputeHistory' >> beam.ParDo(
                _HistoryFn(self._dataset, self._lateness)))


# Windowed aggregates ---------------------------------------------------------
def late_row(record: Dict[str, Any], dataset: Dataset, key_field: str,
             message: str) -> Dict[str, Any]:
  """A dead-letter row for a valid record refused by an aggregate table.

  Same columns as parse's dead-letter rows; `raw` is the record as JSON
  with its event time in RFC 3339, ready to re-ingest.
  """
  ts = dataset.timestamp_field
  raw = dict(record)
  raw[ts] = micros_to_rfc3339(record[ts])
  return {'source_file': None, 'position': None, 'error_kind': LATE,
          'field': key_field, 'message': message, 'raw': _json_row(raw)}


class _RouteLate(beam.DoFn):
  """(key, record) -> (key, record) if admitted, else a 'late' dead-letter row.

  Implements the lateness rule of this module's docstring, per key, in the
  global window (so the runner drops nothing before this decision). State:
  the key's clock and the distinct deadlines (first window end + L) of its
  admitted events whose timers have not fired yet; the timer is set at the
  earliest of them.
  """
  CLOCK = ReadModifyWriteStateSpec('clock', VarIntCoder())
  DEADLINES = ReadModifyWriteStateSpec('deadlines', PickleCoder())
  CLOSE = TimerSpec('close', TimeDomain.WATERMARK)

  def __init__(self, dataset: Dataset, key_field: str,
               windowfn: window.WindowFn, allowed_lateness: int):
    self._dataset, self._key_field = dataset, key_field
    self._windowfn = windowfn
    self._lateness = allowed_lateness * _MICROS

  def setup(self):
    self._late = Metrics.counter(NAMESPACE, 'records_late')
    self._late_kind = Metrics.counter(NAMESPACE, f'dead_letter.{LATE}')

  def _first_end(self, t: int) -> int:
    windows = self._windowfn.assign(
        window.WindowFn.AssignContext(Timestamp(micros=t)))
    return min(w.end.micros for w in windows)

  def process(self, element, clock=beam.DoFn.StateParam(CLOCK),
              deadlines=beam.DoFn.StateParam(DEADLINES),
              close=beam.DoFn.TimerParam(CLOSE)):
    key, record = element
    t = record[self._dataset.timestamp_field]
    first_end = self._first_end(t)
    deadline = first_end + self._lateness
    now = clock.read()
    if now is not None and deadline <= now:
      self._late.inc()
      self._late_kind.inc()
      yield beam.pvalue.TaggedOutput(LATE, late_row(
          record, self._dataset, self._key_field,
          f'{self._key_field} {key}: event at {micros_to_rfc3339(t)} is '
          f'late: its first window ended {micros_to_rfc3339(first_end)}, '
          f'+ allowed lateness {self._lateness // _MICROS}s = '
          f'{micros_to_rfc3339(deadline)}, not after the key clock '
          f'{micros_to_rfc3339(now)}'))
      return
    if now is None or t > now:
      clock.write(t)
    pending = set(deadlines.read() or ())
    if deadline not in pending:
      pending.add(deadline)
      deadlines.write(sorted(pending))
      close.set(Timestamp(micros=min(pending)))
    yield element

  @on_timer(CLOSE)
  def watermark_passed(self, fired=beam.DoFn.TimestampParam,
                       clock=beam.DoFn.StateParam(CLOCK),
                       deadlines=beam.DoFn.StateParam(DEADLINES),
                       close=beam.DoFn.TimerParam(CLOSE)):
    # The watermark has passed `fired`: a lower bound the key's events use.
    now = clock.read()
    if now is None or fired.micros > now:
      clock.write(fired.micros)
    pending = [d for d in deadlines.read() or () if d > fired.micros]
    if pending:
      deadlines.write(pending)
      close.set(Timestamp(micros=pending[0]))
    else:
      deadlines.clear()


class _ToPaneRow(AggregateRow):
  """The batch aggregate row plus the pane: 'EARLY', 'ON_TIME' or 'LATE' and
  its index in the window. Panes accumulate: the row with the highest
  pane_index of a window is its current total."""

  def process(self, element, w=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    for row in super().process(element, w):
      row['pane'] = PaneInfoTiming.to_string(pane.timing)
      row['pane_index'] = pane.index
      yield row


class StreamingEntityAggregates(beam.PTransform):
  """PCollection[dict] valid records (stamped with event time) ->
  {'aggregates': PCollection[dict], 'late': PCollection[dict]}.

  'aggregates': the batch `EntityAggregates` row plus pane and pane_index,
  one per key, window and pane, left in its event-time window. Windows are
  sliding (`size` every `period` seconds; fixed when equal). Panes: early
  every `early_firing` seconds of processing time while a window is open,
  on time when the watermark passes its end, then one late pane per late
  event for `allowed_lateness` seconds; panes accumulate.
  'late': dead-letter rows (error_kind 'late') of events refused by the
  lateness rule of this module's docstring. Counter: records_late.
  """

  def __init__(self, dataset: Dataset, key_field: str, size: int,
               period: Optional[int] = None, allowed_lateness: int = 3600,
               early_firing: int = 60):
    super().__init__()
    self._dataset, self._key_field = dataset, key_field
    self._size, self._period = size, period or size
    self._lateness, self._early = allowed_lateness, early_firing

  def windowfn(self) -> window.WindowFn:
    if self._period == self._size:
      return window.FixedWindows(self._size)
    return window.SlidingWindows(self._size, self._period)

  def expand(self, records):
    key = self._key_field
    value = self._dataset.history.value
    label = self._dataset.label_field
    routed = (
        records
        | 'KeyByField' >> beam.Map(lambda r: (r[key], r)).with_output_types(
            Tuple[str, Dict[str, Any]])
        | 'RouteLateEvents' >> beam.ParDo(_RouteLate(
            self._dataset, key, self.windowfn(),
            self._lateness)).with_outputs(LATE, main=AGGREGATES))
    rows = (
        routed[AGGREGATES]
        | 'WindowByEventTime' >> beam.WindowInto(
            self.windowfn(),
            trigger=trigger.AfterWatermark(
                early=trigger.AfterProcessingTime(self._early),
                late=trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=Duration(seconds=self._lateness))
        | 'KeyAndValue' >> beam.Map(
            lambda kv: (kv[0], (kv[1][value],
                                kv[1].get(label) if label else None)))
        | 'AggregatePerKeyAndWindow' >> beam.CombinePerKey(AggregateAmounts())
        | 'ToRow' >> beam.ParDo(_ToPaneRow(key)))
    return {AGGREGATES: rows, LATE: routed[LATE]}


# Sinks -----------------------------------------------------------------------
class _WritePaneFile(beam.DoFn):

  def __init__(self, directory: str, prefix: str):
    self._directory, self._prefix = directory, prefix

  def process(self, element, pane=beam.DoFn.PaneInfoParam):
    _, lines = element
    path = FileSystems.join(self._directory,
                            f'{self._prefix}-{pane.index:06d}.jsonl')
    with FileSystems.create(path) as f:
      for line in sorted(lines):
        f.write(line.encode('utf-8') + b'\n')
    yield path


class WriteJsonLinesPanes(beam.PTransform):
  """PCollection[dict] -> files `<directory>/<prefix>-<pane:06d>.jsonl`;
  returns PCollection[str] of the paths written.

  Rows are cut into files by processing time (every `every` seconds while
  rows arrive) in the global window, and flushed when the stream ends. A
  sink windowed by event time would drop rows behind the watermark (late
  events, late aggregate panes); this one drops nothing. A restarted job
  starts again at pane 0: give it a fresh directory.
  """

  def __init__(self, directory: str, prefix: str, every: int = 60):
    super().__init__()
    self._directory, self._prefix, self._every = directory, prefix, every

  def expand(self, rows):
    return (rows
            | 'CutByProcessingTime' >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.AfterWatermark(
                    early=trigger.AfterProcessingTime(self._every)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | 'ToJson' >> beam.Map(lambda row: (None, _json_row(row)))
            | 'OneFilePerPane' >> beam.GroupByKey()
            | 'WriteFile' >> beam.ParDo(
                _WritePaneFile(self._directory, self._prefix)))


class WriteJsonToPubSub(beam.PTransform):
  """PCollection[dict] -> JSON messages on a Pub/Sub topic."""

  def __init__(self, topic: str):
    super().__init__()
    self._topic = topic

  def expand(self, rows):
    return (rows
            | 'ToJsonBytes' >> beam.Map(
                lambda row: _json_row(row).encode('utf-8'))
            | 'Publish' >> beam.io.WriteToPubSub(self._topic))
