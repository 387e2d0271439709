"""Output writers: JSON lines built column by column read back as json.dumps."""

import json
import math
import os
import re
import zlib

from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
import pyarrow as pa
from hypothesis import given, settings, strategies as st

from transforms.kafka import keys_and_json
from transforms.sinks import WriteJsonLinesPanes, conform, json_lines


def _same(a, b):
  """Equal JSON values, NaN equal to NaN."""
  if isinstance(a, float) and isinstance(b, float):
    return a == b or (math.isnan(a) and math.isnan(b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(
    # Repeated values too: a column of few values is written per value.
    st.one_of(st.none(), st.text(),
              st.sampled_from(['pos', 'é', 'a"b', 'c\\d', '\n', ''])),
    st.one_of(st.none(), st.floats(),
              st.sampled_from([3.0, -0.0, 1e10, 1e15, 2.0**60, 0.1])),
    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
    st.one_of(st.none(), st.booleans())), max_size=150))
def test_json_lines_read_back_as_json_dumps_rows(rows):
  batch = pa.RecordBatch.from_pylist(
      [dict(zip(('s', 'f', 'i', 'b'), r)) for r in rows],
      schema=pa.schema([('s', pa.string()), ('f', pa.float64()),
                        ('i', pa.int64()), ('b', pa.bool_())]))
  text = json_lines(batch)
  expected = [json.dumps(r, sort_keys=True) for r in batch.to_pylist()]
  lines = text.split('\n') if rows else []
  assert len(lines) == len(expected)
  for line, reference in zip(lines, expected):
    assert _same(json.loads(line), json.loads(reference))
  # Keys come in json.dumps' sorted order.
  if rows:
    assert list(json.loads(lines[0])) == ['b', 'f', 'i', 's']


def test_conform_casts_micros_and_fills_missing_columns():
  batch = pa.RecordBatch.from_pydict({'t': [0, 1_000_000], 'x': [1, 2]})
  schema = pa.schema([('t', pa.timestamp('us', tz='UTC')),
                      ('y', pa.string())])
  table = conform(batch, schema)
  assert table.schema == schema
  assert table.column('t').cast(pa.int64()).to_pylist() == [0, 1_000_000]
  assert table.column('y').to_pylist() == [None, None]


def _streaming_pipeline():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


def _stream(batches):
  return TestStream().add_elements(batches).advance_watermark_to_infinity()


def _batches(n_batches, rows_per_batch):
  return [pa.RecordBatch.from_pylist(
      [{'id': f'r{b:02d}{i:03d}', 'score': (b * rows_per_batch + i) / 7}
       for i in range(rows_per_batch)]) for b in range(n_batches)]


def test_pane_files_spread_over_shards_keep_every_row_once(tmp_path):
  # Twelve batches over three shards: every row lands in exactly one file,
  # the files are named by pane and shard, and more than one shard is used
  # (one key held a whole pane, and Flink's heap ran out copying it).
  batches = _batches(12, 5)
  with _streaming_pipeline() as p:
    paths = (p | _stream(batches)
             | WriteJsonLinesPanes(str(tmp_path), 'rows', every=60,
                                   shards=3))
    assert_that(paths, equal_to([
        str(tmp_path / f'rows-000000-{s:03d}.jsonl')
        for s in {zlib.crc32(json_lines(b).encode()) % 3 for b in batches}]))
  names = sorted(os.listdir(tmp_path))
  assert len(names) > 1
  assert all(re.fullmatch(r'rows-000000-00[0-2]\.jsonl', n) for n in names)
  rows = [json.loads(line) for n in names
          for line in (tmp_path / n).read_text().splitlines()]
  expected = [r for b in batches for r in b.to_pylist()]
  assert sorted(r['id'] for r in rows) == sorted(r['id'] for r in expected)
  assert len(rows) == len(expected)


def test_pane_file_is_the_same_whatever_the_batch_order(tmp_path):
  batches = _batches(6, 3)
  for name, order in (('a', batches), ('b', batches[::-1])):
    with _streaming_pipeline() as p:
      _ = p | _stream(order) | WriteJsonLinesPanes(
          str(tmp_path / name), 'rows')
  assert ((tmp_path / 'a' / 'rows-000000.jsonl').read_bytes()
          == (tmp_path / 'b' / 'rows-000000.jsonl').read_bytes())


def test_kafka_records_of_a_batch_are_its_rows_keyed_by_id():
  batch = pa.RecordBatch.from_pylist(
      [{'id': 'a', 'score': 0.25}, {'id': None, 'score': 1.0},
       {'id': 'c', 'score': None}])
  records = keys_and_json(batch, 'id')
  assert [k for k, _ in records] == [b'a', b'', b'c']
  assert [json.loads(v) for _, v in records] == batch.to_pylist()
  assert keys_and_json(batch, 'missing')[0][0] == b''
  assert keys_and_json(batch.slice(0, 0), 'id') == []

