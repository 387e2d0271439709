"""Timestamps as declared: formats, zones, date + hour; both parse paths agree."""

import datetime

from hypothesis import given, settings, strategies as st
import pyarrow as pa

from schemas.dataset import load_dataset
from transforms.parse import BatchValidator, RecordValidator, RecordError
from transforms.read import raw_records

DECLARATION = """
name: times
roles: {id: id, timestamp: local}
fields:
  id: {type: string, required: true}
  local: {type: timestamp, required: true, format: '%d/%m/%Y %H:%M',
          zone: Europe/Lisbon}
  naive: {type: timestamp, zone: America/New_York}
  day: {type: string}
  hour: {type: int}
  composed: {type: timestamp, from: {date: day, hour: hour}, zone: UTC}
"""


def _dataset(tmp_path):
  path = tmp_path / 'times.yaml'
  path.write_text(DECLARATION)
  return load_dataset(str(path))


def _batch(rows):
  names = ['id', 'local', 'naive', 'day', 'hour']
  rows = [dict(zip(names, r), __source='f', __position=i, __raw=None,
               __error=None, __error_kind=None, __undecoded=False)
          for i, r in enumerate(rows)]
  return pa.RecordBatch.from_pylist(rows, schema=pa.schema(
      [(n, pa.int64() if n == 'hour' else pa.string()) for n in names] +
      [('__source', pa.string()), ('__position', pa.int64()),
       ('__raw', pa.string()), ('__error', pa.string()),
       ('__error_kind', pa.string()), ('__undecoded', pa.bool_())]))


def _micros(*args, tz=datetime.timezone.utc):
  value = datetime.datetime(*args, tzinfo=tz)
  return int(value.timestamp()) * 10**6


def test_format_zone_and_composition(tmp_path):
  dataset = _dataset(tmp_path)
  valid, dead = BatchValidator(dataset).validate(_batch([
      ('a', '15/07/2026 10:30', '2026-07-15 10:30:00', '2026-07-15', 3),
      # Lisbon falls back at 02:00 on 25 Oct 2026: 01:30 happens twice.
      ('b', '25/10/2026 01:30', '2026-07-15T10:30:00+02:00', None, None),
      # ... and springs forward at 01:00 on 29 Mar 2026: 01:30 never is.
      ('c', '29/03/2026 01:30', None, None, None),
      ('d', '15/7/2026 9:05', None, '2026-13-01', 1),
  ]))
  rows = {r['id']: r for r in valid.to_pylist()}
  assert rows['a']['local'] == _micros(2026, 7, 15, 9, 30)   # WEST = UTC+1
  assert rows['a']['naive'] == _micros(2026, 7, 15, 14, 30)  # EDT = UTC-4
  assert rows['a']['composed'] == _micros(2026, 7, 15, 3)
  # Ambiguous: the earlier instant (still summer time, UTC+1).
  assert rows['b']['local'] == _micros(2026, 10, 25, 0, 30)
  assert rows['b']['naive'] == _micros(2026, 7, 15, 8, 30)   # its own offset
  assert rows['b']['composed'] is None
  kinds = {row['position']: (row['error_kind'], row['field'])
           for row in dead}
  assert kinds == {2: ('type_error', 'local'), 3: ('type_error', 'composed')}
  assert 'daylight-saving gap' in next(r['message'] for r in dead
                                       if r['position'] == 2)


_TEXT = st.one_of(
    st.text(alphabet='0123456789/: ', max_size=18),
    st.builds(lambda d, m, y, h, mi: f'{d}/{m}/{y} {h}:{mi}',
              st.integers(0, 32), st.integers(0, 13), st.integers(1900, 2100),
              st.integers(0, 25), st.integers(0, 61)),
    st.builds(lambda d, m, y, h, mi: f'{d:02d}/{m:02d}/{y} {h:02d}:{mi:02d}',
              st.integers(1, 28), st.sampled_from([3, 10, 7]),
              st.sampled_from([2025, 2026]), st.integers(0, 3),
              st.integers(0, 59)))


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.tuples(_TEXT, st.one_of(st.none(), _TEXT),
                                 st.integers(-2, 25)), min_size=1,
                       max_size=12))
def test_batch_and_record_paths_agree(tmp_path_factory, values):
  dataset = _dataset(tmp_path_factory.mktemp('t'))
  batch = _batch([(f'r{i}', local, None, day and f'20{day[-2:]}-0{i % 9 + 1}'
                   f'-1{i % 9}', hour)
                  for i, (local, day, hour) in enumerate(values)])
  valid, dead = BatchValidator(dataset).validate(batch)
  by_id = {r['id']: r for r in valid.to_pylist()}
  dead_at = {r['position']: r for r in dead}
  single = RecordValidator(dataset)
  for raw in raw_records(batch):
    try:
      record = single.validate(raw)
    except RecordError as e:
      assert dead_at[raw.position]['error_kind'] == e.kind
      assert dead_at[raw.position]['message'] == e.message
    else:
      row = by_id[record['id']]
      assert {k: row[k] for k in dataset.fields} == record
