"""Kafka in and out, in the Python workers (librdkafka), a batch at a time.

`ReadKafkaRecords` gives the values of the records one poll of a partition
got as one element (decoded an element at a time by
transforms.stream_sources.MessageBatches, never one JSON parse per record);
`WriteJsonToKafka` writes the rows of RecordBatches as JSON records, built a
column at a time, from the step that made them.

Why not Beam's cross-language KafkaIO (the Java read and write this module
used before): its read, a splittable DoFn, polls a partition for
`consumer_polling_timeout` (whole seconds, 1 the least) and does not return
while records keep coming; on a portable runner its records and watermark
leave the read's stage only when it returns, so paced at 1,000 events/s on
Flink they came in chunks of ~1.2 s (p99 producer -> prediction 1.8-2.0
s). It also crossed from Java to Python one record at a time, in a stage of
its own. `_ReadPartition` returns every poll (LINGER_SECONDS), and nothing
needs a JVM but the runner's (bench/RESULTS.md, "Kafka read and written in Python").

A bounded read (`max_num_records`) reads the topic with one consumer over
every partition and stops after the limit in total, however the records
are spread (KafkaIO's own limit gave every partition an equal share, so a
partition holding fewer records than its share waited for them forever).
"""

import os
import time
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.restriction_trackers import (OffsetRange,
                                                 OffsetRestrictionTracker)
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
import pyarrow as pa

from transforms.sinks import json_lines

# A partition's reader waits up to POLL_SECONDS for a record, then takes
# what comes within LINGER_SECONDS more (at most MAX_POLL_RECORDS), hands it
# on as one element and checkpoints itself: on a portable runner an
# element, and the watermark, leave the read's stage only when that call
# returns. The linger is the trade between latency and the fixed cost of
# each element in every keyed step after it (Kafka on Flink, paced at
# 1,000 events/s: 0.05 s fell behind, 0.1 s p50 ~0.4 s, 0.4 s p50 ~0.8 s;
# bench/RESULTS.md).
POLL_SECONDS = 0.1
LINGER_SECONDS = 0.1
# A backlog (100,000 events sent at once) goes in elements this large:
# 18,673 events/s at 20,000, 17,118 at 5,000 (bench/RESULTS.md).
MAX_POLL_RECORDS = 20000
# An unbounded partition's restriction: every offset from its first on.
_NO_END = 2**63 - 1


def _consumer(servers: str):
  """A librdkafka consumer for assigned partitions: no group membership
  (the group id is only librdkafka's requirement), nothing committed, a
  position below the log's start read from its first record."""
  from confluent_kafka import Consumer  # pylint: disable=import-outside-toplevel
  return Consumer({'bootstrap.servers': servers,
                   'group.id': 'mlpipe-unused',
                   'enable.auto.commit': False,
                   'enable.auto.offset.store': False,
                   'auto.offset.reset': 'earliest',
                   # The broker answers a fetch as soon as it has a record,
                   # and within this when it has none.
                   'fetch.wait.max.ms': 50})


class _Partitions(beam.DoFn):
  """(anything) -> (topic, partition) for every partition of `topic`,
  waiting for the topic to be created, as a consumer would."""

  def __init__(self, servers: str, topic: str, wait_s: float = 0.5):
    self._servers, self._topic, self._wait = servers, topic, wait_s

  def process(self, unused) -> Iterable[Tuple[str, int]]:
    consumer = _consumer(self._servers)
    try:
      while True:
        topics = consumer.list_topics(self._topic, timeout=10).topics
        found = topics.get(self._topic)
        if found is not None and found.error is None and found.partitions:
          break
        time.sleep(self._wait)
      for n in sorted(found.partitions):
        yield self._topic, n
    finally:
      consumer.close()


class _UnboundedOffsetTracker(OffsetRestrictionTracker):
  """A partition's offsets from a start on, never done."""

  def is_bounded(self):
    return False


class _PartitionOffsets(RestrictionProvider):
  """(topic, partition) -> OffsetRange(first offset to read, never): every
  record from the partition's first (no group, nothing committed: a run's
  outputs are a function of the topic, as a replay's of its file)."""

  def initial_restriction(self, element):
    return OffsetRange(0, _NO_END)

  def create_tracker(self, restriction):
    return _UnboundedOffsetTracker(restriction)

  def restriction_size(self, element, restriction):
    return 1

  def truncate(self, element, restriction):
    return None  # drained: stop reading


class _ReadPartition(beam.DoFn):
  """(topic, partition) -> List[bytes], the values of the records one poll
  got (offset order, at most MAX_POLL_RECORDS within POLL_SECONDS), one
  element per poll, stamped with the earliest record's Kafka timestamp
  (CreateTime: producers set it to the event time).

  A splittable DoFn over the partition's offsets: each call polls once,
  claims the last offset it got and checkpoints itself, so the runner
  keeps the position (in Flink's checkpoints) and the records leave every
  POLL_SECONDS. The watermark is the latest timestamp seen; a partition
  that has had records and then has none for a poll moves it to the wall
  clock (KafkaIO's CreateTime policy, idle partitions included). Consumers
  are kept per partition between calls and sought only when the position
  the runner gives differs from where the consumer stands."""

  def __init__(self, servers: str):
    self._servers = servers

  def setup(self):
    self._readers: Dict[Tuple[str, int], list] = {}

  def teardown(self):
    for consumer, _ in self._readers.values():
      consumer.close()
    self._readers = {}

  def _reader(self, part: Tuple[str, int], offset: int):
    from confluent_kafka import TopicPartition  # pylint: disable=import-outside-toplevel
    reader = self._readers.get(part)
    if reader is None:
      reader = self._readers[part] = [_consumer(self._servers), None]
    if reader[1] != offset:
      reader[0].assign([TopicPartition(part[0], part[1], offset)])
      reader[1] = offset
    return reader

  @beam.DoFn.unbounded_per_element()
  def process(self, part,
              tracker=beam.DoFn.RestrictionParam(_PartitionOffsets()),
              watermark=beam.DoFn.WatermarkEstimatorParam(
                  ManualWatermarkEstimator.default_provider())):
    part = tuple(part)
    reader = self._reader(part, tracker.current_restriction().start)
    # What the consumer holds (librdkafka fetches ahead); else wait up to
    # POLL_SECONDS for a record and take it with whatever came with it.
    # Under load the records that came while the last poll's were being
    # processed make the next element: batches grow with the rate, and an
    # idle stream is answered as soon as a record comes.
    messages = reader[0].consume(1, POLL_SECONDS)
    if messages:
      messages += reader[0].consume(MAX_POLL_RECORDS - 1, LINGER_SECONDS)
    records = [m for m in messages if m.error() is None]
    for m in messages:
      if m.error() is not None and m.error().fatal():
        raise RuntimeError(f'Kafka {part[0]}[{part[1]}]: {m.error().str()}')
    if records:
      last = records[-1].offset()
      if not tracker.try_claim(last):
        reader[1] = None  # past the runner's split: seek next time
        return
      reader[1] = last + 1
      times = [m.timestamp()[1] for m in records]

      yield TimestampedValue([m.value() or b'' for m in records],
                             min(times) / 1000)
      _advance(watermark, Timestamp.of(max(times) / 1000))
    elif watermark.current_watermark() is not None:
      # Idle after records: its next records are newer than the wall clock.
      _advance(watermark, Timestamp.now())
    tracker.defer_remainder()


def _advance(watermark, to: Timestamp):
  current = watermark.current_watermark()
  if current is None or to > current:
    watermark.set_watermark(to)


class _ReadFirstRecords(beam.DoFn):
  """(anything) -> List[bytes], the values of the first `limit` records of
  `topic`, one element per poll, stamped with its earliest record's Kafka
  timestamp (CreateTime), as _ReadPartition's.

  One consumer, assigned every partition from its first offset (no group,
  nothing committed), polls until `limit` records came; while the topic
  holds fewer it waits for more, as an unbounded read would. Which records
  make the limit when the topic holds more depends on the fetch order, as
  with KafkaIO."""

  def __init__(self, servers: str, topic: str, limit: int,
               poll_ms: int = 500):
    self._servers, self._topic = servers, topic
    self._limit, self._poll_ms = limit, poll_ms

  def process(self, unused):
    # No return annotation: Beam would type the output TimestampedValue,
    # not the bytes it carries.
    # kafka-python, on the worker: only bounded runs need it.
    from kafka import KafkaConsumer, TopicPartition  # pylint: disable=import-outside-toplevel
    consumer = KafkaConsumer(bootstrap_servers=self._servers.split(','),
                             enable_auto_commit=False, group_id=None,
                             auto_offset_reset='earliest',
                             max_poll_records=5000)
    try:
      partitions = consumer.partitions_for_topic(self._topic)
      while not partitions:  # not created yet: wait, as KafkaIO does
        time.sleep(self._poll_ms / 1000)
        partitions = consumer.partitions_for_topic(self._topic)
      assigned = [TopicPartition(self._topic, n) for n in sorted(partitions)]
      consumer.assign(assigned)
      consumer.seek_to_beginning(*assigned)
      left = self._limit
      while left > 0:
        polled = consumer.poll(timeout_ms=self._poll_ms,
                               max_records=min(left, 5000))
        for partition in sorted(polled):
          messages = polled[partition][:left]
          if messages:
            yield TimestampedValue([m.value or b'' for m in messages],
                                   min(m.timestamp for m in messages) / 1000)
          left -= len(messages)
    finally:
      consumer.close()


class ReadKafkaRecords(beam.PTransform):
  """PBegin -> PCollection[List[bytes]], the values of Kafka records, one
  element per poll of a partition (offset order).

  Each value is one JSON object; `MessageBatches` decodes an element at a
  time (a value that is not a JSON object, or not UTF-8, becomes a
  dead-letter row, as a Pub/Sub message would). Elements carry their
  earliest record's Kafka timestamp (CreateTime: producers set it to the
  event time) and the watermark follows the records' timestamps (see
  _ReadPartition); StreamingParseAndValidate re-stamps valid records with
  their event-time field either way. Unbounded, every partition is read
  from its first record by a splittable DoFn (_ReadPartition), the
  partitions spread over the workers. `max_num_records` bounds the read
  (tests, benchmarks): the stream then ends after that many records in
  total, however they are spread over the partitions (_ReadFirstRecords:
  see the module's docstring); the watermark then jumps to the end when
  the read is done.
  """

  def __init__(self, bootstrap_servers: str, topic: str,
               max_num_records: Optional[int] = None):
    super().__init__()
    self._servers, self._topic = bootstrap_servers, topic
    self._max = max_num_records

  def expand(self, pbegin):
    start = pbegin | 'Start' >> beam.Impulse()
    if self._max:
      return start | 'ReadFirstRecords' >> beam.ParDo(_ReadFirstRecords(
          self._servers, self._topic, self._max))
    return (start
            | 'Partitions' >> beam.ParDo(_Partitions(self._servers,
                                                     self._topic))
            # One reader per partition, spread over the workers.
            | 'SpreadPartitions' >> beam.Reshuffle()
            | 'ReadPartitions' >> beam.ParDo(_ReadPartition(self._servers)))


def keys_and_json(batch, key_field: Optional[str]) -> List[Tuple[bytes, bytes]]:
  """A RecordBatch -> (key, JSON) of each row, as Kafka records: the JSON
  built a column at a time (`json_lines`), the key the row's `key_field`
  (empty when the batch has no such column or the value is null)."""
  if not batch.num_rows:
    return []
  values = [line.encode('utf-8') for line in json_lines(batch).split('\n')]
  if key_field and key_field in batch.schema.names:
    keys = [b'' if k is None else k.encode('utf-8') for k in
            batch.column(key_field).cast(pa.string()).to_pylist()]
  else:
    keys = [b''] * batch.num_rows
  return list(zip(keys, values))


class _ProduceRows(beam.DoFn):
  """pa.RecordBatch -> its rows as JSON records on `topic` (librdkafka's
  producer, batched and sent in the background), keyed by `key_field`.
  Every record of a bundle is acknowledged by the broker before the bundle
  ends (a runner's checkpoint waits for that), else the bundle fails and
  the runner retries it: at least once, as KafkaIO's sink."""

  def __init__(self, servers: str, topic: str, key_field: Optional[str],
               flush_s: float = 60.0):
    self._servers, self._topic, self._key = servers, topic, key_field
    self._flush_s = flush_s

  def setup(self):
    from confluent_kafka import Producer  # pylint: disable=import-outside-toplevel
    self._producer = Producer({'bootstrap.servers': self._servers,
                               # Sent within 5 ms: a batch's rows go in a
                               # few requests, and none waits longer.
                               'linger.ms': 5})
    self._failed = None

  def _delivered(self, error, unused_message):
    if error is not None and self._failed is None:
      self._failed = error

  def process(self, batch: pa.RecordBatch):
    for key, value in keys_and_json(batch, self._key):
      while True:
        try:
          self._producer.produce(self._topic, value=value, key=key or None,
                                 on_delivery=self._delivered)
          break
        except BufferError:  # librdkafka's queue is full: let it send
          self._producer.poll(0.01)
    self._producer.poll(0)

  def finish_bundle(self):
    left = self._producer.flush(self._flush_s)
    failed, self._failed = self._failed, None
    if left or failed is not None:
      raise RuntimeError(f'Kafka topic {self._topic}: '
                         f'{failed or f"{left} records not acknowledged"}')

  def teardown(self):
    self._producer.flush(self._flush_s)


class WriteJsonToKafka(beam.PTransform):
  """PCollection[pa.RecordBatch] -> one JSON record per row on a Kafka
  topic, keyed by `key_field` (the record id; empty when a row has
  none). In Python, fused with the step that made the rows: no stage of
  its own, no Java."""

  def __init__(self, bootstrap_servers: str, topic: str,
               key_field: Optional[str] = None):
    super().__init__()
    self._servers, self._topic, self._key = bootstrap_servers, topic, key_field

  def expand(self, rows):
    return rows | 'ProduceRows' >> beam.ParDo(
        _ProduceRows(self._servers, self._topic, self._key))

