"""The Kafka read and write (transforms.kafka) against the session's broker:
a poll is one element, the read's position and watermark, at least once out."""

import json
import time

import pyarrow as pa
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.runners.sdf_utils import (RestrictionTrackerView,
                                           ThreadsafeRestrictionTracker)
from apache_beam.utils.timestamp import Duration, Timestamp

from tests.services import consume_all, create_topic, kafka_broker  # noqa: F401  pylint: disable=unused-import
from transforms import kafka


def _produce(bootstrap, topic, partition, stamps_ms):
  from confluent_kafka import Producer  # pylint: disable=import-outside-toplevel
  producer = Producer({'bootstrap.servers': bootstrap})
  for n, stamp in enumerate(stamps_ms):
    producer.produce(topic, value=json.dumps({'n': n}).encode(),
                     partition=partition, timestamp=stamp)
  producer.flush()


class _Call:
  """One call of _ReadPartition.process as a runner makes it: the
  restriction the runner holds, the watermark state it kept."""

  def __init__(self, read, part, start, watermark=None):
    self.tracker = _view(start)
    self.watermark = ManualWatermarkEstimator(watermark)
    self.out = list(read.process(part, tracker=self.tracker,
                                 watermark=self.watermark))

  @property
  def residual_start(self):
    """Where the runner resumes: the checkpoint's residual."""
    residual, delay = self.tracker._threadsafe_restriction_tracker.deferred_status()  # pylint: disable=protected-access
    assert delay == Duration()  # at once
    return residual.start

  def values(self):
    return [[json.loads(v)['n'] for v in e.value] for e in self.out]


def _first_records(read, part, start, watermark=None):
  """Calls until one gets records (a new consumer's first polls may come
  back empty while it connects: the runner then calls again from the same
  position, and the watermark stays where it was)."""
  for _ in range(100):
    call = _Call(read, part, start, watermark)
    if call.out:
      return call
    assert call.residual_start == start
    assert call.watermark.current_watermark() == watermark
  raise AssertionError(f'no records from {part} in 100 polls')


def _view(start):
  return RestrictionTrackerView(ThreadsafeRestrictionTracker(
      kafka._UnboundedOffsetTracker(OffsetRange(start, kafka._NO_END))))  # pylint: disable=protected-access


def test_a_poll_is_one_element_and_the_runner_keeps_the_position(
    kafka_broker):  # noqa: F811
  create_topic(kafka_broker, 'polls', partitions=2)
  _produce(kafka_broker, 'polls', 0, [5000 + 10 * n for n in range(30)])
  _produce(kafka_broker, 'polls', 1, [9000])
  read = kafka._ReadPartition(kafka_broker)  # pylint: disable=protected-access
  read.setup()
  try:
    first = _first_records(read, ('polls', 0), 0)
    # One element: the poll's values in offset order, stamped with its
    # earliest record's time; the watermark at its latest.
    assert first.values() == [list(range(30))]
    assert first.out[0].timestamp == Timestamp.of(5.0)
    assert first.watermark.current_watermark() == Timestamp.of(5.29)
    # The call checkpointed itself: the runner resumes after the last
    # record it claimed.
    assert first.residual_start == 30
    # Nothing new: an idle partition that has had records moves its
    # watermark to the wall clock (as KafkaIO's create-time policy).
    before = time.time()
    idle = _Call(read, ('polls', 0), 30, first.watermark.current_watermark())
    assert idle.out == [] and idle.residual_start == 30
    assert idle.watermark.current_watermark() >= Timestamp.of(before)
    # A runner restored from an earlier checkpoint gives an earlier start:
    # the kept consumer is sought back, and the records read again.
    again = _first_records(read, ('polls', 0), 25)
    assert again.values() == [[25, 26, 27, 28, 29]]
    # Each partition is its own restriction.
    other = _first_records(read, ('polls', 1), 0)
    assert other.values() == [[0]] and other.residual_start == 1
  finally:
    read.teardown()


def test_a_partition_that_never_had_records_holds_the_watermark(
    kafka_broker):  # noqa: F811
  create_topic(kafka_broker, 'empty', partitions=1)
  read = kafka._ReadPartition(kafka_broker)  # pylint: disable=protected-access
  read.setup()
  try:
    call = _Call(read, ('empty', 0), 0)
    assert call.out == [] and call.residual_start == 0
    assert call.watermark.current_watermark() is None
  finally:
    read.teardown()


def test_the_partitions_of_a_topic_are_listed_once_it_exists(
    kafka_broker):  # noqa: F811
  create_topic(kafka_broker, 'three', partitions=3)
  parts = list(kafka._Partitions(kafka_broker, 'three').process(None))  # pylint: disable=protected-access
  assert parts == [('three', 0), ('three', 1), ('three', 2)]


def test_rows_are_written_keyed_and_acknowledged_by_the_bundle_end(
    kafka_broker):  # noqa: F811
  create_topic(kafka_broker, 'rows', partitions=1)
  write = kafka._ProduceRows(kafka_broker, 'rows', 'id')  # pylint: disable=protected-access
  write.setup()
  write.process(pa.RecordBatch.from_pylist(
      [{'id': 'a', 'score': 0.5}, {'id': None, 'score': 0.25}]))
  write.finish_bundle()  # returns once the broker has every record
  write.teardown()
  got = [json.loads(v) for v in consume_all(kafka_broker, 'rows', 2, 30)]
  assert got == [{'id': 'a', 'score': 0.5}, {'id': None, 'score': 0.25}]


def test_a_write_the_broker_does_not_acknowledge_fails_the_bundle():
  """The runner retries a failed bundle: at least once, never lost."""
  write = kafka._ProduceRows('127.0.0.1:1', 'rows', None, flush_s=0.5)  # pylint: disable=protected-access
  write.setup()
  write.process(pa.RecordBatch.from_pylist([{'score': 0.5}]))
  try:
    write.finish_bundle()
    raise AssertionError('the bundle ended with a record not acknowledged')
  except RuntimeError as e:
    assert 'Kafka topic rows: 1 records not acknowledged' in str(e)
