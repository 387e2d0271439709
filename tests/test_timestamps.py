"""Timestamps as declared: formats, zones, date + hour; both parse paths agree."""

import datetime

from hypothesis import example, given, settings, strategies as st
import pytest
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
# Lisbon in 2038: past the end of Arrow's zone rules, an hour off.
@example(values=[('01/10/2038 00:00', None, 0)])
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


# Every format string: the column path says what the per-value definition says
def _two_paths(dataset, rows, names):
  """(valid rows by id from BatchValidator, the same from RecordValidator
  with its dead letters) for raw rows of string columns `names`."""
  batch = pa.RecordBatch.from_pylist(
      [dict(zip(names, r), __source='f', __position=i, __raw=None,
            __error=None, __error_kind=None, __undecoded=False)
       for i, r in enumerate(rows)],
      schema=pa.schema([(n, pa.int64() if n == 'hour' else pa.string())
                        for n in names] +
                       [('__source', pa.string()), ('__position', pa.int64()),
                        ('__raw', pa.string()), ('__error', pa.string()),
                        ('__error_kind', pa.string()),
                        ('__undecoded', pa.bool_())]))
  valid, dead = BatchValidator(dataset).validate(batch)
  columns = {r['id']: r for r in valid.to_pylist()}
  dead_at = {d['position']: (d['error_kind'], d['message']) for d in dead}
  single, single_dead = {}, {}
  for raw in raw_records(batch):
    try:
      record = RecordValidator(dataset).validate(raw)
    except RecordError as e:
      single_dead[raw.position] = (e.kind, e.message)
    else:
      single[record['id']] = record
  columns = {k: {n: v[n] for n in dataset.fields} for k, v in columns.items()}
  return columns, dead_at, single, single_dead


def _declare(tmp_path, text):
  path = tmp_path / 'times.yaml'
  path.write_text(text)
  return load_dataset(str(path))


def test_a_day_of_year_needs_a_year_and_then_both_paths_agree(tmp_path):
  """Arrow's strptime ignores %j: '365' became 1899-12-31 on the column
  path (it prints back as '365') and 1900-12-31 per record."""
  from schemas.dataset import SchemaError
  hourly = """
name: hourly
roles: {id: id, timestamp: at}
fields:
  id: {type: string, required: true}
  day: {type: string, required: true}
  hour: {type: int, required: true}
  at: {type: timestamp, required: true, from: FROM}
"""
  with pytest.raises(SchemaError, match=r"^times.yaml: fields.at.from."
                     r"date_format: '%j' has no year: every date would fall "
                     r'in 1900; add %Y, or declare the year: year: 2011$'):
    _declare(tmp_path, hourly.replace(
        'FROM', "{date: day, hour: hour, date_format: '%j'}"))
  dataset = _declare(tmp_path, hourly.replace(
      'FROM', "{date: day, hour: hour, date_format: '%j', year: 2011}"))
  rows = [('a', '365', 5), ('b', '032', 0), ('c', '1', 23), ('d', 'x', 1),
          ('e', '365', 24)] + [(f'r{i}', '365', i % 24) for i in range(30)]
  columns, dead, single, single_dead = _two_paths(
      dataset, rows, ['id', 'day', 'hour'])
  assert columns == single and dead == single_dead
  assert columns['a']['at'] == _micros(2011, 12, 31, 5)
  assert columns['b']['at'] == _micros(2011, 2, 1, 0)
  assert columns['c']['at'] == _micros(2011, 1, 1, 23)
  assert dead == {3: ('type_error', "at: date 'x' does not match %j in 2011"),
                  4: ('type_error', 'at: hour 24 is not 0-23')}


def test_hour_of_year_from_a_fixed_date(tmp_path):
  """`since`: a table of hours of the year without any date column."""
  dataset = _declare(tmp_path, """
name: hours
roles: {id: id, timestamp: at}
fields:
  id: {type: string, required: true}
  hour: {type: int, required: true}
  at: {type: timestamp, required: true, zone: Europe/Lisbon,
       from: {since: 2011-01-01, hour: hour}}
""")
  # Lisbon: WET (UTC) in January, WEST (UTC+1) from 27 March 01:00 UTC;
  # hour 2041 of 2011 = 27 March 01:00 local, the hour skipped.
  rows = [('a', 0), ('b', 8759), ('c', 2041), ('d', -1), ('e', 2042)]
  columns, dead, single, single_dead = _two_paths(
      dataset, rows, ['id', 'hour'])
  assert columns == single and dead == single_dead
  assert columns['a']['at'] == _micros(2011, 1, 1, 0)
  assert columns['b']['at'] == _micros(2011, 12, 31, 23)
  assert columns['e']['at'] == _micros(2011, 3, 27, 1)   # 02:00 WEST
  assert set(dead) == {2, 3}
  assert 'daylight-saving gap' in dead[2][1]


_DIRECTIVES = ['%Y', '%y', '%m', '%d', '%j', '%H', '%M', '%S', '%I', '%p',
               '%a', '%b', '%B', '%f', '%U', '%w', '%%']


@settings(max_examples=120, deadline=None)
@given(parts=st.lists(st.sampled_from(_DIRECTIVES), min_size=1, max_size=6,
                      unique=True),
       separators=st.lists(st.sampled_from(['', ' ', '-', '/', ':', 'T']),
                           min_size=6, max_size=6),
       moments=st.lists(st.datetimes(datetime.datetime(1901, 1, 1),
                                     datetime.datetime(2099, 12, 31)),
                        min_size=1, max_size=6),
       cut=st.integers(0, 3))
def test_every_format_string_gives_the_same_times_on_both_paths(
    tmp_path_factory, parts, separators, moments, cut):
  """Property: for any strptime format (a year declared in it or as a
  constant), the values it prints, and the same cut short, the column path
  and the per-record definition agree."""
  fmt = ''.join(s + p for s, p in zip(separators, parts))
  if any(p in ('%Y', '%y') for p in parts):
    stamp = f"{{type: timestamp, format: '{fmt}'}}"
    composed = f"{{date: text, date_format: '{fmt}'}}"
  else:
    stamp = '{type: string}'
    composed = f"{{date: text, date_format: '{fmt}', year: 2012}}"
  dataset = _declare(tmp_path_factory.mktemp('f'), f"""
name: formats
roles: {{id: id}}
fields:
  id: {{type: string, required: true}}
  text: {{type: string}}
  stamp: {stamp}
  at: {{type: timestamp, from: {composed}}}
""")
  texts = [m.strftime(fmt) for m in moments]
  texts += [t[:len(t) - cut] for t in texts] + texts[:1]
  columns, dead, single, single_dead = _two_paths(
      dataset, [(f'r{i}', t, t) for i, t in enumerate(texts)],
      ['id', 'text', 'stamp'])
  assert columns == single
  assert dead == single_dead
