"""How the Kafka read is configured (no broker: KafkaIO is replaced)."""

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to


def test_the_kafka_read_returns_to_the_runner_every_second(monkeypatch):
  """KafkaIO's read hands its records and watermark on when a poll cycle
  returns (on a portable runner): the unbounded read asks for 1 s cycles,
  not Beam's default 2 s."""
  from transforms import kafka  # pylint: disable=import-outside-toplevel
  seen = {}

  class FakeRead(beam.PTransform):
    create_time_policy = 'CreateTime'

    def __init__(self, **kwargs):
      super().__init__()
      seen.update(kwargs)

    def expand(self, pbegin):
      return pbegin | beam.Create([(b'k', b'{}')])

  monkeypatch.setattr(kafka, 'ReadFromKafka', FakeRead)
  with TestPipeline() as p:
    values = p | kafka.ReadKafkaRecords('127.0.0.1:1', 'topic', None)
    assert_that(values, equal_to([b'{}']))
  assert seen['consumer_polling_timeout'] == 1
  assert seen['timestamp_policy'] == 'CreateTime'
