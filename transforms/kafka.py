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
"""

import os
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka, WriteToKafka
from apache_beam.transforms.external import JavaJarExpansionService

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


class ReadKafkaRecords(beam.PTransform):
  """PBegin -> PCollection[RawRecord] from a Kafka topic.

  Each record's value is one JSON object (decoded as a Pub/Sub message is:
  transforms.stream_sources.decode_message; a value that is not a JSON object, or not
  UTF-8, becomes a malformed RawRecord, hence a dead-letter row). Elements
  carry the record's Kafka timestamp (CreateTime: producers set it to the
  event time) and the watermark follows it; StreamingParseAndValidate
  re-stamps valid records with their event-time field either way.
  `max_num_records` bounds the read (tests, benchmarks): the stream then
  ends after that many records.
  """

  def __init__(self, bootstrap_servers: str, topic: str, expansion_service,
               max_num_records: Optional[int] = None):
    super().__init__()
    self._servers, self._topic = bootstrap_servers, topic
    self._expansion, self._max = expansion_service, max_num_records

  def expand(self, pbegin):
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
                max_num_records=self._max,
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

