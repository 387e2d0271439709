"""Streaming history features with more than one history (the interactions'
user then item) on several shards, and the expiry of history state by the
watermark (transforms/history_features.py, StatefulHistoryFeatures)."""

import json
import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas.dataset import load_dataset
from transforms.common import shard_of
from transforms.history_features import (StatefulHistoryFeatures,
                                         history_table)

INTERACTIONS = load_dataset('interactions')
TRANSACTIONS = load_dataset()
MIN = 60 * 1_000_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T0 = 1_790_812_800 * 1_000_000   # 2026-10-01T00:00:00Z


def _streaming():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


def _stream():
  return TestStream(coder=beam.coders.PickleCoder())


def _interaction(i, user, item, t, kind='view', value=1.0):
  return {'interaction_id': i, 'user_id': user, 'item_id': item,
          'interaction_type': kind, 'value': value, 'event_time': t}


def _at(dataset, records):
  """A streaming batch of `records`, stamped with its earliest event time
  (as every streaming batch is)."""
  return TimestampedValue(
      pa.RecordBatch.from_pylist(list(records),
                                 schema=dataset.batch_schema()),
      Timestamp(micros=min(r['event_time'] for r in records)))


def _batch_rows(dataset, records):
  """The batch definition's rows (history_table, every history) as JSON."""
  table = history_table(pa.Table.from_pylist(
      records, schema=dataset.batch_schema()), dataset)
  return [json.dumps(r, sort_keys=True) for r in table.to_pylist()]


def _stream_rows(p, stream, dataset, shards):
  return (p | stream
          | StatefulHistoryFeatures(dataset, 3600, num_shards=shards)
          | beam.FlatMap(lambda b: b.to_pylist())
          | beam.Map(json.dumps, sort_keys=True))


def _users_on_two_shards(shards=2):
  users = np.arange(20)
  shard = shard_of(pa.array(users), shards)
  return int(users[shard == 0][0]), int(users[shard == 1][0])


# A second history on a parallel runner --------------------------------------
def test_a_second_history_counts_rows_still_waiting_in_another_users_shard():
  # Users a and b are on different shards of the user history. a's batch
  # holds i1 (item 5, 10 min) and i3 (item 6, 50 min); b's holds i2 (item
  # 5, 20 min). When the watermark passes 30 min, b's shard computes i2,
  # while a's still waits for its batch's newest (50 min). Chained, the
  # item history then computed i2 at once, before i1 reached it: i2's item
  # counts were 0. By hand, as batch: i2's item 5 has i1 10 minutes before
  # it, so item_id_count_1d = 1 and one distinct user in 7 d.
  a, b = _users_on_two_shards()
  i1 = _interaction(1, a, 5, T0 + 10 * MIN)
  i2 = _interaction(2, b, 5, T0 + 20 * MIN)
  i3 = _interaction(3, a, 6, T0 + 50 * MIN, kind='purchase')
  stream = (_stream()
            .add_elements([_at(INTERACTIONS, [i1, i3])])
            .add_elements([_at(INTERACTIONS, [i2])])
            .advance_watermark_to(Timestamp(micros=T0 + 30 * MIN))
            .advance_watermark_to(Timestamp(micros=T0 + 60 * MIN))
            .advance_watermark_to_infinity())
  expected = _batch_rows(INTERACTIONS, [i1, i2, i3])
  row_2 = [json.loads(r) for r in expected if '"interaction_id": 2,' in r][0]
  assert (row_2['item_id_count_1d'], row_2['item_id_distinct_user_id_7d'],
          row_2['user_id_count_1d']) == (1, 1, 0)
  with _streaming() as p:
    assert_that(_stream_rows(p, stream, INTERACTIONS, shards=2),
                equal_to(expected))


def _interactions(n_events=900, n_users=30, n_items=12, seed=3):
  """Events over 3 days on a 5-minute grid (ties are common)."""
  rng = random.Random(seed)
  kinds = ['view', 'view', 'click', 'add_to_cart', 'purchase']
  records = [_interaction(i, rng.randrange(n_users), rng.randrange(n_items),
                          T0 + rng.randrange(3 * 24 * 12) * 5 * MIN,
                          rng.choice(kinds), rng.choice([0.0, 1.5, 20.0]))
             for i in range(n_events)]
  records.sort(key=lambda r: (r['event_time'], r['interaction_id']))
  return records


def test_every_history_equals_batch_with_shuffled_arrival_on_many_shards():
  # Each chunk of 90 events arrives in three batches in random order, as a
  # parallel runner's shuffles deliver them, then the watermark moves to
  # the chunk's median event time: a shard computes the rows it has passed
  # only once it passes their batch's newest, so shards flush at different
  # steps. Every event is on time (the next chunk is later than this one),
  # so every row (user and item features) is batch's.
  records = _interactions()
  stream = _stream()
  for start in range(0, len(records), 90):
    chunk = random.Random(start).sample(records[start:start + 90], 90)
    stream.add_elements([_at(INTERACTIONS, chunk[i:i + 30])
                         for i in (60, 0, 30)])
    stream.advance_watermark_to(Timestamp(micros=sorted(
        r['event_time'] for r in chunk)[45]))
  # Past every event before the end, as a replay ends.
  stream.advance_watermark_to(Timestamp(micros=records[-1]['event_time']))
  stream.advance_watermark_to_infinity()
  with _streaming() as p:
    assert_that(_stream_rows(p, stream, INTERACTIONS, shards=4),
                equal_to(_batch_rows(INTERACTIONS, records)))
