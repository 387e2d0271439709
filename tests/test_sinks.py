"""Output writers: JSON lines built column by column read back as json.dumps."""

import json
import math

import pyarrow as pa
from hypothesis import given, settings, strategies as st

from transforms.sinks import conform, json_lines


def _same(a, b):
  """Equal JSON values, NaN equal to NaN."""
  if isinstance(a, float) and isinstance(b, float):
    return a == b or (math.isnan(a) and math.isnan(b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(
    st.one_of(st.none(), st.text()),
    st.one_of(st.none(), st.floats()),
    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
    st.one_of(st.none(), st.booleans())), max_size=40))
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
