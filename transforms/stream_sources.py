"""The streaming sources: a replay of files (local runs and tests) and
Pub/Sub, one RawRecord per event; `decode_message` decodes one message (a
Pub/Sub or Kafka message, a request body) with the JSON lines reader's
rules. Kafka's source is transforms.kafka.

The batch readers are transforms.read; a replay reads its files with them
when the pipeline is built.
"""

import base64
import dataclasses
import json
from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from schemas.dataset import Dataset
from transforms.common import MICROS
from transforms.parse import RecordError, RecordValidator
from transforms.formats.jsonl_format import (
    line_problem as _json_line_problem)
from transforms.formats.lines import NOT_UTF8 as _NOT_UTF8
from transforms.read import RawRecord, check_input, read_file


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


def _time_only_validator(dataset: Dataset):
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
            for raw in read_file(path, self._dataset, self._format)]
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
            (last - previous) / MICROS / self._speed)
      stream.add_elements([window.TimestampedValue(raw, Timestamp(micros=t))
                           for t, raw in chunk])
      # TestStream keeps watermarks (and element times) in milliseconds.
      mark = last - last % 1000
      if watermark is None or mark > watermark:
        stream.advance_watermark_to(Timestamp(micros=mark))
        watermark = mark
      previous = last
    return stream.advance_watermark_to_infinity()

  def expand(self, pbegin):
    return pbegin | 'EmitInEventTimeOrder' >> self.test_stream()
