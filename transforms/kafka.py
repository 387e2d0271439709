"""Kafka in and out, through Beam's cross-language KafkaIO (Java).

`ReadKafkaRecords` gives each Kafka record's value as bytes (decoded a
bundle at a time by transforms.stream_sources.MessageBatches, never one
JSON parse per record); `WriteJsonToKafka` writes the rows of
RecordBatches as JSON records, built a column at a time. Both expand through
a Java expansion service started from a local jar
(`kafka_expansion_service`), never one downloaded at run time: the jar is
the launcher runners/fetch_jars.sh builds (runners/.jars/
beam-expansion-service.jar). The Java transforms run in the EMBEDDED
environment, i.e. inside the runner's own JVM (Flink's TaskManagers), so
no Docker image for a Java SDK harness is needed.

KafkaIO runs on portable runners that execute Java transforms (Flink,
Dataflow), not on the Python DirectRunner.

A bounded read (`max_num_records`) is not KafkaIO's: KafkaIO hands its
limit to Beam's BoundedReadFromUnboundedSource, which splits a topic by
partition (from 10,000 records on) and gives every partition an equal
share of the limit, so a partition holding fewer records than its share
waits for them forever (20,012 records over two uneven partitions never
finished) while a fuller one stops early. `_ReadFirstRecords` reads the
topic with one Kafka consumer over every partition instead and stops after
the limit in total, however the records are spread.
"""

import os
import time
from typing import List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka, WriteToKafka
from apache_beam.transforms.external import JavaJarExpansionService

from apache_beam.transforms.window import TimestampedValue
import pyarrow as pa

from transforms.sinks import json_lines

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXPANSION_JAR = os.path.join(REPO_ROOT, 'runners', '.jars',
                                     'beam-expansion-service.jar')


def kafka_expansion_service(jar: str) -> JavaJarExpansionService:
  """An expansion service started from the local `jar` whose Java
  transforms run embedded in the runner's JVM."""
  return JavaJarExpansionService(
      jar, extra_args=['{{PORT}}', '--defaultEnvironmentType=EMBEDDED',
                       f'--filesToStage={jar}'])


# Seconds KafkaIO's read (a splittable DoFn) polls a partition before it
# returns and checkpoints itself (Beam's default 2; whole seconds only, 1
# the least). On a portable runner its records and its watermark leave
# the read's stage only when it returns, so each event waited there for
# up to this long: paced at 1,000 events/s on Flink, p50 from producer to
# prediction 1.67 s at 2, 1.05-1.12 s at 1 (bench/RESULTS.md).
POLL_SECONDS = 1


class _ReadFirstRecords(beam.DoFn):
  """(anything) -> the values (bytes) of the first `limit` records of
  `topic`, each stamped with the record's Kafka timestamp (CreateTime).

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
          for message in polled[partition][:left]:
            yield TimestampedValue(message.value or b'',
                                   message.timestamp / 1000)
          left -= min(left, len(polled[partition]))
    finally:
      consumer.close()


class ReadKafkaRecords(beam.PTransform):
  """PBegin -> PCollection[bytes], the value of each Kafka record.

  Each value is one JSON object; `MessageBatches` decodes them a bundle at
  a time (a value that is not a JSON object, or not UTF-8, becomes a
  dead-letter row, as a Pub/Sub message would). Elements
  carry the record's Kafka timestamp (CreateTime: producers set it to the
  event time) and the watermark follows it; StreamingParseAndValidate
  re-stamps valid records with their event-time field either way.
  `max_num_records` bounds the read (tests, benchmarks): the stream then
  ends after that many records in total, however they are spread over the
  partitions (_ReadFirstRecords, a Python consumer: see the module's
  docstring for why not KafkaIO's own limit); the watermark then jumps to
  the end when the read is done.
  """

  def __init__(self, bootstrap_servers: str, topic: str, expansion_service,
               max_num_records: Optional[int] = None):
    super().__init__()
    self._servers, self._topic = bootstrap_servers, topic
    self._expansion, self._max = expansion_service, max_num_records

  def expand(self, pbegin):
    if self._max:
      return (pbegin
              | 'Start' >> beam.Impulse()
              | 'ReadFirstRecords' >> beam.ParDo(_ReadFirstRecords(
                  self._servers, self._topic, self._max)))
    return (pbegin
            | 'ReadFromKafka' >> ReadFromKafka(
                # No group.id, nothing committed, and every partition read
                # from its first record: a run's outputs are a function of
                # the topic, as a replay's of its file. (start_read_time
                # would fail on a partition with no records.)
                consumer_config={'bootstrap.servers': self._servers,
                                 'auto.offset.reset': 'earliest'},
                topics=[self._topic],
                timestamp_policy=ReadFromKafka.create_time_policy,
                consumer_polling_timeout=POLL_SECONDS,
                expansion_service=self._expansion)
            | 'RecordValues' >> beam.Map(lambda kv: kv[1] or b''))


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


class WriteJsonToKafka(beam.PTransform):
  """PCollection[pa.RecordBatch] -> one JSON record per row on a Kafka
  topic, keyed by `key_field` (the record id; empty when a row has
  none)."""

  def __init__(self, bootstrap_servers: str, topic: str, expansion_service,
               key_field: Optional[str] = None):
    super().__init__()
    self._servers, self._topic = bootstrap_servers, topic
    self._expansion, self._key = expansion_service, key_field

  def expand(self, rows):
    return (rows
            | 'ToKeysAndJson' >> beam.FlatMap(
                keys_and_json, self._key).with_output_types(
                    Tuple[bytes, bytes])
            | 'WriteToKafka' >> WriteToKafka(
                producer_config={'bootstrap.servers': self._servers},
                topic=self._topic, expansion_service=self._expansion))

