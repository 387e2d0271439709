"""Kafka in and out, through Beam's cross-language KafkaIO (Java).

`ReadKafkaRecords` gives one RawRecord per Kafka record, like the Pub/Sub
source; `WriteJsonToKafka` writes rows as JSON records. Both expand through
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
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka, WriteToKafka
from apache_beam.transforms.external import JavaJarExpansionService

from apache_beam.transforms.window import TimestampedValue

from transforms.common import json_row
from transforms.stream_sources import decode_message

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXPANSION_JAR = os.path.join(REPO_ROOT, 'runners', '.jars',
                                     'beam-expansion-service.jar')


def kafka_expansion_service(jar: str) -> JavaJarExpansionService:
  """An expansion service started from the local `jar` whose Java
  transforms run embedded in the runner's JVM."""
  return JavaJarExpansionService(
      jar, extra_args=['{{PORT}}', '--defaultEnvironmentType=EMBEDDED',
                       f'--filesToStage={jar}'])


class _ReadFirstRecords(beam.DoFn):
  """(anything) -> the first `limit` records of `topic`, each a RawRecord
  stamped with the record's Kafka timestamp (CreateTime).

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
    # not the RawRecord it carries.
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
      source, left = f'kafka:{self._topic}', self._limit
      while left > 0:
        polled = consumer.poll(timeout_ms=self._poll_ms,
                               max_records=min(left, 5000))
        for partition in sorted(polled):
          for message in polled[partition][:left]:
            yield TimestampedValue(
                decode_message(message.value or b'', source),
                message.timestamp / 1000)
          left -= min(left, len(polled[partition]))
    finally:
      consumer.close()


class ReadKafkaRecords(beam.PTransform):
  """PBegin -> PCollection[RawRecord] from a Kafka topic.

  Each record's value is one JSON object (decoded as a Pub/Sub message is:
  transforms.stream_sources.decode_message; a value that is not a JSON object, or not
  UTF-8, becomes a malformed RawRecord, hence a dead-letter row). Elements
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
    source = f'kafka:{self._topic}'
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
                expansion_service=self._expansion)
            | 'DecodeRecords' >> beam.Map(
                lambda kv: decode_message(kv[1] or b'', source)))


def _key_and_json(row: dict, key_field: Optional[str]) -> Tuple[bytes, bytes]:
  key = row.get(key_field) if key_field else None
  return (b'' if key is None else str(key).encode('utf-8'),
          json_row(row).encode('utf-8'))


class WriteJsonToKafka(beam.PTransform):
  """PCollection[dict] -> JSON records on a Kafka topic, keyed by
  `key_field` (the record id; empty when a row has none)."""

  def __init__(self, bootstrap_servers: str, topic: str, expansion_service,
               key_field: Optional[str] = None):
    super().__init__()
    self._servers, self._topic = bootstrap_servers, topic
    self._expansion, self._key = expansion_service, key_field

  def expand(self, rows):
    return (rows
            | 'ToKeyAndJson' >> beam.Map(
                _key_and_json, self._key).with_output_types(
                    Tuple[bytes, bytes])
            | 'WriteToKafka' >> WriteToKafka(
                producer_config={'bootstrap.servers': self._servers},
                topic=self._topic, expansion_service=self._expansion))

