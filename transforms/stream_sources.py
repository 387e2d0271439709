"""The streaming sources, whose elements are raw RecordBatches (the batch
readers' raw batches, transforms.read): a replay of files (local runs and
tests), Pub/Sub, and `MessageBatches`, which turns messages (a Kafka or
Pub/Sub source's, one per event) into raw batches, a bundle at a time.
`decode_message` decodes one message (a request body) with the JSON lines
reader's rules; `message_batch` decodes many at once with pyarrow's JSON
reader, falling back to one message at a time only for those it refuses.
Kafka's source is transforms.kafka.

Every streaming batch is stamped with the earliest event time (or arrival
time) of its rows, so the watermark never passes a batch that is still on
its way.
"""

import base64
import dataclasses
import json
from typing import Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
import numpy as np
import pyarrow as pa

from schemas.dataset import Dataset
from transforms.common import MICROS, compact, table_to_batch
from transforms.formats.jsonl_format import (decode_lines, json_schema,
                                             line_problem as _json_line_problem)
from transforms.formats.lines import NOT_UTF8 as _NOT_UTF8, lines_of
from transforms.parse import BatchValidator, RecordError, RecordValidator
from transforms.read import (POSITION, RAW, SOURCE, RawRecord, check_input,
                             raw_batch, read_batches)


def decode_message(data: bytes, source: str) -> RawRecord:
  """One Pub/Sub message (a JSON object) -> RawRecord; never raises.

  Messages have no position in a stream, so `position` is -1. The error
  texts are those of the JSON lines reader.
  """
  text = data.decode('utf-8', errors='replace').strip()
  try:
    data.decode('utf-8')
  except UnicodeDecodeError:
    return RawRecord(source, -1, text, None, _NOT_UTF8 + base64.b64encode(
        data).decode('ascii'))
  problem = _json_line_problem(text)
  if problem:
    return RawRecord(source, -1, text, None, problem)
  return RawRecord(source, -1, text, json.loads(text))


class ReadPubSubRecords(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch] raw batches (`MessageBatches`)
  from a Pub/Sub subscription or topic.

  Each message is one JSON object. Messages carry the publish time, or the
  `timestamp_attribute` when publishers set one (then the watermark follows
  event time); StreamingParseAndValidate re-stamps valid batches with their
  earliest event time either way.
  """

  def __init__(self, dataset: Dataset, subscription: Optional[str] = None,
               topic: Optional[str] = None,
               timestamp_attribute: Optional[str] = None):
    super().__init__()
    if bool(subscription) == bool(topic):
      raise ValueError('give exactly one of subscription or topic')
    self._dataset = dataset
    self._subscription, self._topic = subscription, topic
    self._timestamp_attribute = timestamp_attribute

  def expand(self, pbegin):
    source = f'pubsub:{self._subscription or self._topic}'
    return (pbegin
            | 'ReadMessages' >> beam.io.ReadFromPubSub(
                subscription=self._subscription, topic=self._topic,
                timestamp_attribute=self._timestamp_attribute,
                with_attributes=False)
            | 'DecodeMessageBatches' >> MessageBatches(self._dataset, source))


def _time_only_dataset(dataset: Dataset) -> Dataset:
  """The declaration of the timestamp field alone: the same coercion as
  the parser, to order a replay without validating every record twice."""
  ts = dataset.timestamp_field
  return dataclasses.replace(dataset, fields={ts: dataset.fields[ts]},
                             rules=())


def replay_order(raws: Iterable[RawRecord],
                 dataset: Dataset) -> List[Tuple[int, RawRecord]]:
  """(event time in micros, record) in event-time order (then file order),
  one RawRecord at a time (tests/services.py produces Kafka topics with
  it); `replay_table` is the columnar form the replay uses.

  A record whose event time cannot be read (it will be dead-lettered) takes
  the time of the readable record before it in the file, or the first
  readable time, so it travels with its neighbours and is never late.
  """
  validator = RecordValidator(_time_only_dataset(dataset))
  ts = dataset.timestamp_field
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


def _event_times(batch: pa.RecordBatch, validator: BatchValidator
                 ) -> np.ndarray:
  """The event time of each row of a raw batch (int64 micros), or -1 where
  it cannot be read: the batch validator on the timestamp field alone
  (valid rows keep their POSITION, which is unique in one file)."""
  times = np.full(batch.num_rows, -1, dtype=np.int64)
  if batch.num_rows == 0:
    return times
  valid, _ = validator.validate(batch)
  if valid.num_rows:
    positions = batch.column(POSITION).to_numpy()
    rows = np.searchsorted(positions, valid.column(POSITION).to_numpy())
    times[rows] = valid.column(validator.dataset.timestamp_field).to_numpy()
  return times


def replay_table(paths: Sequence[str], dataset: Dataset,
                 input_format: Optional[str] = None
                 ) -> Tuple[np.ndarray, pa.Table]:
  """(event times, raw rows) of every record of `paths`, in event-time
  order (then file, then position): the columnar `replay_order`, with the
  same rule for records whose time cannot be read (the previous readable
  time in their file, else the file's first)."""
  validator = BatchValidator(_time_only_dataset(dataset))
  tables, times = [], []
  for path in paths:
    batches = list(read_batches(path, dataset, input_format))
    if not batches:
      continue
    t = np.concatenate([_event_times(b, validator) for b in batches])
    known = np.flatnonzero(t >= 0)
    if len(known):
      # Forward fill from the previous readable row; leading rows take
      # the first readable time.
      last = np.maximum.accumulate(np.where(t >= 0, np.arange(len(t)), -1))
      t = np.where(last >= 0, t[np.maximum(last, 0)], t[known[0]])
    else:
      t = np.zeros(len(t), dtype=np.int64)
    tables.append(pa.Table.from_batches(batches, schema=None)
                  if len({b.schema for b in batches}) == 1 else
                  pa.concat_tables([pa.Table.from_batches([b])
                                    for b in batches], promote=True))
    times.append(t)
  if not tables:
    return np.zeros(0, np.int64), pa.table({})
  table = pa.concat_tables(tables, promote=True).combine_chunks()
  t = np.concatenate(times)
  sources = table.column(SOURCE).combine_chunks().to_numpy(
      zero_copy_only=False)
  positions = table.column(POSITION).combine_chunks().to_numpy()
  order = np.lexsort((positions, sources, t))
  return t[order], table.take(pa.array(order))


# Messages -----------------------------------------------------------------------
def message_batch(texts: Sequence[Optional[str]],
                  errors: Sequence[Optional[str]], source: str,
                  dataset: Dataset) -> pa.RecordBatch:
  """Messages (each one JSON object, as text; an error instead where the
  message could not even be read as text) -> one raw batch, as the JSON
  lines reader makes of a file: pyarrow's JSON reader decodes them at
  once, and a message it refuses is decoded alone (`decode_message`'s
  rules). Messages have no position in a stream: POSITION is -1."""
  n = len(texts)
  good = [i for i in range(n) if errors[i] is None]
  schema = json_schema(dataset)
  # One message per line: a message holding a newline is decoded alone.
  lines = lines_of([(texts[i] or '').replace('\n', ' ') for i in good])
  decoded = list(decode_lines(lines, source, 0, schema))
  if len(good) == n:
    batch = decoded[0] if len(decoded) == 1 else _concat(decoded)
  else:
    bad = [i for i in range(n) if errors[i] is not None]
    failed = raw_batch(pa.Table.from_pylist([{}] * len(bad), schema=schema),
                       source, 0, raw=[texts[i] for i in bad],
                       errors=[errors[i] for i in bad])
    batch = _concat(decoded + [failed])
    order = np.argsort(np.array(good + bad), kind='stable')
    batch = batch.take(pa.array(order))
  # Undecoded rows are decoded again from RAW, which must be the message
  # as it came (not the one-line copy the block decoder read).
  arrays = list(batch.columns)
  arrays[batch.schema.get_field_index(RAW)] = pa.array(list(texts),
                                                       pa.string())
  arrays[batch.schema.get_field_index(POSITION)] = pa.array(
      np.full(n, -1, np.int64))
  return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def _concat(batches: List[pa.RecordBatch]) -> pa.RecordBatch:
  return table_to_batch(pa.Table.from_batches(batches))


def _text_and_error(message) -> Tuple[Optional[str], Optional[str]]:
  """A message (bytes, or a RawRecord from transforms.kafka) -> (text,
  error): bytes that are not UTF-8 are an error, kept in base64."""
  if isinstance(message, RawRecord):
    return message.text, message.error
  data = message or b''
  try:
    return data.decode('utf-8').strip(), None
  except UnicodeDecodeError:
    return (data.decode('utf-8', errors='replace').strip(),
            _NOT_UTF8 + base64.b64encode(data).decode('ascii'))


class _BatchPerBundle(beam.DoFn):
  """Messages, or lists of messages (a Kafka poll) -> raw batches of at
  most `max_rows`, one per bundle (and more in a large bundle), stamped
  with the earliest element time."""

  def __init__(self, dataset: Dataset, source: str, max_rows: int):
    self._dataset, self._source, self._max = dataset, source, max_rows

  def start_bundle(self):
    self._texts, self._errors, self._first = [], [], None

  def process(self, message, timestamp=beam.DoFn.TimestampParam):
    if self._first is None or timestamp < self._first:
      self._first = timestamp
    for one in message if isinstance(message, list) else [message]:
      text, error = _text_and_error(one)
      self._texts.append(text)
      self._errors.append(error)
      if len(self._texts) >= self._max:
        yield window.TimestampedValue(self._batch(), self._first)
        self.start_bundle()
        self._first = timestamp

  def finish_bundle(self):
    if self._texts:
      yield WindowedValue(self._batch(), self._first,
                          [window.GlobalWindow()])
      self.start_bundle()

  def _batch(self) -> pa.RecordBatch:
    return message_batch(self._texts, self._errors, self._source,
                         self._dataset)


class MessageBatches(beam.PTransform):
  """PCollection[bytes | RawRecord | List[bytes]] messages, one per event
  or a list of them per element, in the global window ->
  PCollection[pa.RecordBatch] raw batches (transforms.read's
  columns, POSITION -1), one per bundle of at most `max_rows` messages.

  `source` names the stream in SOURCE (e.g. 'kafka:transactions').
  """

  def __init__(self, dataset: Dataset, source: str, max_rows: int = 4096):
    super().__init__()
    self._dataset, self._source, self._max = dataset, source, max_rows

  def expand(self, messages):
    return messages | 'DecodeEachBundle' >> beam.ParDo(
        _BatchPerBundle(self._dataset, self._source, self._max))

class ReplayFile(beam.PTransform):
  """PBegin -> PCollection[pa.RecordBatch] (unbounded) raw batches, a file
  replayed as a stream.

  The files matched by `pattern` are read with the batch readers when the
  pipeline is built, ordered by event time (`replay_table`) and emitted
  through a TestStream, `batch` records per raw batch, each batch stamped
  with its first (earliest) event time; after each batch the watermark
  advances to the batch's last event time. So windows close, panes fire
  and timers run as they would on a live, in-order stream. This is a
  DirectRunner source for local runs and tests; production streams read
  Kafka or Pub/Sub.

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
    times, table = replay_table(check_input(self._pattern, self._format),
                                self._dataset, self._format)
    self.replayed = len(times)
    # Pickled: a RecordBatch has no Beam coder of its own.
    stream = TestStream(coder=PickleCoder())
    watermark = previous = None
    rows = table_to_batch(table) if len(times) else None
    for start in range(0, len(times), self._batch):
      end = min(start + self._batch, len(times))
      first, last = int(times[start]), int(times[end - 1])
      if self._speed and previous is not None and last > previous:
        stream.advance_processing_time(
            (last - previous) / MICROS / self._speed)
      stream.add_elements([window.TimestampedValue(
          compact(rows.slice(start, end - start)), Timestamp(micros=first))])
      # TestStream keeps watermarks (and element times) in milliseconds.
      mark = last - last % 1000
      if watermark is None or mark > watermark:
        stream.advance_watermark_to(Timestamp(micros=mark))
        watermark = mark
      previous = last
    if watermark is not None:
      # One step past the last event before the end: timers that steps
      # set behind the watermark fire in it (a timer set during the jump
      # to the end of time never fires on the DirectRunner).
      stream.advance_watermark_to(Timestamp(micros=watermark + 1000))
    return stream.advance_watermark_to_infinity()

  def expand(self, pbegin):
    return pbegin | 'EmitInEventTimeOrder' >> self.test_stream()
