"""ReadRecords and ParseAndValidate: every record is either valid or dead-lettered."""

import gzip
import json

import apache_beam as beam
import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas.dataset import load_dataset
from hypothesis import given, settings, strategies as st

from transforms.common import DEAD_LETTER, VALID
from transforms.parse import (BatchValidator, ParseAndValidate, RecordError,
                              RecordValidator, rfc3339_to_micros)
from transforms.read import (InputError, RawRecord, ReadRecords, check_input,
                             raw_records, read_batches)
from transforms.stream_sources import decode_message

DATASET = load_dataset()
GOOD = {'transaction_id': 'tx000000001', 'user_id': 'u00001',
        'merchant_id': 'm00001', 'merchant_category': 'grocery',
        'amount': 12.5, 'currency': 'USD', 'channel': 'pos', 'country': 'US',
        'event_time': '2026-10-01T10:00:00Z', 'is_fraud': 0}
# 2026-10-01T10:00:00Z in epoch microseconds.
GOOD_MICROS = 1_790_848_800 * 1_000_000


def _raw(values=None, error=None, position=0, source='f.jsonl'):
  text = json.dumps(values) if values is not None else 'garbage'
  return RawRecord(source, position, text, values, error)


def _with(**changes):
  values = dict(GOOD)
  for key, value in changes.items():
    if value is _with.DROP:
      del values[key]
    else:
      values[key] = value
  return values


_with.DROP = object()


def test_valid_record_is_typed():
  record = RecordValidator(DATASET).validate(
      _raw(_with(amount='12.50', is_fraud='1')))
  assert record['amount'] == 12.5
  assert record['is_fraud'] == 1
  assert record['event_time'] == GOOD_MICROS


def test_offsets_are_converted_to_utc():
  record = RecordValidator(DATASET).validate(
      _raw(_with(event_time='2026-10-01T12:00:00+02:00')))
  assert record['event_time'] == GOOD_MICROS


@pytest.mark.parametrize('values,error,kind,field', [
    (None, 'not valid JSON', 'malformed', None),
    (_with(amount=_with.DROP), None, 'missing_required', 'amount'),
    (_with(user_id=''), None, 'missing_required', 'user_id'),
    (_with(amount='twelve'), None, 'type_error', 'amount'),
    (_with(amount=True), None, 'type_error', 'amount'),
    (_with(amount=float('nan')), None, 'type_error', 'amount'),
    (_with(is_fraud=0.5), None, 'type_error', 'is_fraud'),
    (_with(user_id=17), None, 'type_error', 'user_id'),
    (_with(event_time='2026-10-01T10:00:00'), None, 'type_error',
     'event_time'),
    (_with(event_time='yesterday'), None, 'type_error', 'event_time'),
    (_with(amount=99999.0), None, 'out_of_range', 'amount'),
    (_with(currency='XYZ'), None, 'not_allowed', 'currency'),
    (_with(is_fraud=2), None, 'not_allowed', 'is_fraud'),
    (_with(user_id='user-1'), None, 'pattern_mismatch', 'user_id'),
    (_with(transaction_id='tx' + '1' * 20), None, 'too_long',
     'transaction_id'),
    (_with(amount=-5.0), None, 'rule_violation', 'amount'),
    (_with(channel='refund', amount=5.0), None, 'rule_violation', 'amount'),
])
def test_each_error_kind(values, error, kind, field):
  with pytest.raises(RecordError) as caught:
    RecordValidator(DATASET).validate(_raw(values, error))
  assert (caught.value.kind, caught.value.field) == (kind, field)


def test_freshness_against_reference_time():
  reference = GOOD_MICROS + 91 * 86400 * 1_000_000
  validator = RecordValidator(DATASET, reference_micros=reference)
  with pytest.raises(RecordError) as caught:  # 91 days old > max_age 90d
    validator.validate(_raw(GOOD))
  assert caught.value.kind == 'stale'
  future = RecordValidator(DATASET, reference_micros=GOOD_MICROS - 301
                           * 1_000_000)  # 301 s ahead > max_future 5m
  with pytest.raises(RecordError, match='after the reference'):
    future.validate(_raw(GOOD))
  fresh = RecordValidator(DATASET, reference_micros=GOOD_MICROS + 299
                          * 1_000_000)
  assert fresh.validate(_raw(GOOD))['event_time'] == GOOD_MICROS
  assert rfc3339_to_micros('2026-10-01T10:00:00Z') == GOOD_MICROS
  with pytest.raises(ValueError, match='RFC 3339'):
    rfc3339_to_micros('soon')


def test_optional_label_may_be_missing():
  record = RecordValidator(DATASET).validate(_raw(_with(is_fraud=None)))
  assert record['is_fraud'] is None


def _rows(batches, label='Rows'):
  """PCollection[RecordBatch] -> PCollection[dict], one per row."""
  return batches | label >> beam.FlatMap(lambda b: b.to_pylist())


def _lines(path, lines):
  path.write_text(''.join(line + '\n' for line in lines))
  return str(path)


def test_pipeline_splits_and_first_copy_wins(tmp_path):
  dup = _with(transaction_id='tx000000002')
  _lines(tmp_path / 'a.jsonl', ['{}', json.dumps(dup)])   # read first: a < b
  _lines(tmp_path / 'b.jsonl', ['{}', '{}', '{}', json.dumps(dup)])
  _lines(tmp_path / 'f.jsonl', [
      json.dumps(GOOD), '{}', 'garbage',
      json.dumps(_with(amount='x', transaction_id='tx000000003'))])
  with TestPipeline() as p:
    out = (p | ReadRecords(str(tmp_path / '*.jsonl'), DATASET)
           | ParseAndValidate(DATASET, num_shards=3))
    assert_that(_rows(out[VALID], 'ValidRows') | 'Ids' >> beam.Map(
        lambda r: r['transaction_id']),
                equal_to(['tx000000001', 'tx000000002']), label='valid')
    assert_that(
        _rows(out[DEAD_LETTER], 'DeadRows') | 'Kinds' >> beam.Map(
            lambda r: (r['source_file'].rsplit('/', 1)[-1], r['position'],
                       r['error_kind'], r['message'].split(':')[0])),
        equal_to([('a.jsonl', 0, 'missing_required', 'transaction_id is '
                   'required but missing'),
                  ('b.jsonl', 0, 'missing_required', 'transaction_id is '
                   'required but missing'),
                  ('b.jsonl', 1, 'missing_required', 'transaction_id is '
                   'required but missing'),
                  ('b.jsonl', 2, 'missing_required', 'transaction_id is '
                   'required but missing'),
                  ('b.jsonl', 3, 'duplicate', 'id tx000000002 already read '
                   'at ' + str(tmp_path / 'a.jsonl')),
                  ('f.jsonl', 1, 'missing_required', 'transaction_id is '
                   'required but missing'),
                  ('f.jsonl', 2, 'malformed', 'not valid JSON'),
                  ('f.jsonl', 3, 'type_error', 'amount')]), label='dead')


def _per_record(batches):
  """The reference: every row through RecordValidator alone."""
  validator, valid, dead = RecordValidator(DATASET), [], []
  for batch in batches:
    for raw in raw_records(batch):
      try:
        valid.append(validator.validate(raw))
      except RecordError as e:
        dead.append((raw.source, raw.position, e.kind, e.field, e.message,
                     raw.text))
  return valid, dead


def _batched(batches, reference=None):
  validator, valid, dead = BatchValidator(DATASET, reference), [], []
  for batch in batches:
    good, bad = validator.validate(batch)
    valid += [{k: v for k, v in row.items() if not k.startswith('__')}
              for row in good.to_pylist()]
    dead += [(d['source_file'], d['position'], d['error_kind'], d['field'],
              d['message'], d['raw']) for d in bad]
  return valid, dead


def _same(a, b):
  key = lambda row: json.dumps(row, sort_keys=True, default=str)
  return sorted(map(key, a)) == sorted(map(key, b))


def test_a_malformed_line_gives_the_same_rows_as_per_record_parsing(tmp_path):
  """One bad line in a block: the block decoder refuses it, the lines
  around it still decode in blocks, and every row matches the per-record
  path (valid records, and dead-letter kind, message and raw text)."""
  records = [_with(transaction_id=f'tx{i:09d}', amount=10.0 + i)
             for i in range(200)]
  lines = [json.dumps(r) for r in records]
  lines[57] = lines[57][:40]                                # truncated
  lines[90] = json.dumps(_with(transaction_id='tx000000090',
                               amount='12.50'))           # text number
  lines[120] = '[1, 2]'                                   # not an object
  lines[121] = json.dumps(records[121]) + json.dumps(records[122])
  path = _lines(tmp_path / 'mixed.jsonl', lines)
  batches = list(read_batches(path, DATASET))
  ref_valid, ref_dead = _per_record(batches)
  valid, dead = _batched(batches)
  assert len(valid) == 197 and len(dead) == 3
  assert _same(valid, ref_valid)
  assert sorted(dead) == sorted(ref_dead)
  assert {d[1] for d in dead} == {57, 120, 121}
  text_number = [r for r in valid if r['transaction_id'] == 'tx000000090']
  assert text_number[0]['amount'] == 12.5


_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(['', '  ', '12.50', '-3', '1e3', '0x10', '1_000', '007',
                     'USD', 'XYZ', 'refund', 'pos', 'grocery', 'US', 'us',
                     'u00001', 'm00001', 'tx000000001', 'tx12345678901',
                     '2026-10-01T10:00:00Z', '2026-10-01T10:00:00.25+02:00',
                     '2026-10-01T10:00:00+24:00', '2026-02-30T10:00:00Z',
                     '2026-10-01 10:00:00Z', '2026-10-01T10:00:00',
                     '2026-10-01T10:00:00.1234567Z', '0001-01-01T00:00:00Z']))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(list(GOOD)), _VALUE,
                                max_size=4), min_size=1, max_size=30),
       st.integers(0, 2**31))
def test_batch_validator_equals_the_record_validator(changes, seed):
  """Property: on records with arbitrary field values (wrong types, blanks,
  huge numbers, odd timestamps), the column checks plus fallback give
  exactly the per-record result, whichever file format carries them."""
  import random
  rnd = random.Random(seed)
  records = []
  for i, change in enumerate(changes):
    values = _with(transaction_id=f'tx{i:09d}')
    values.update(change)
    records.append(values)
  lines = [json.dumps(r) for r in records]
  if rnd.random() < 0.3:
    lines.insert(rnd.randrange(len(lines) + 1), '{"transaction_id": ')
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    path = _lines(__import__('pathlib').Path(tmp) / 'r.jsonl', lines)
    batches = list(read_batches(path, DATASET))
    reference = GOOD_MICROS if rnd.random() < 0.5 else None
    ref_validator = RecordValidator(DATASET, reference)
    ref_valid, ref_dead = [], []
    for batch in batches:
      for raw in raw_records(batch):
        try:
          ref_valid.append(ref_validator.validate(raw))
        except RecordError as e:
          ref_dead.append((raw.source, raw.position, e.kind, e.field,
                           e.message, raw.text))
    valid, dead = _batched(batches, reference)
  assert _same(valid, ref_valid)
  assert sorted(dead, key=str) == sorted(ref_dead, key=str)


def _write_all_formats(tmp_path, records):
  """The same records as JSON lines (gzip), CSV, Avro and Parquet."""
  paths = {}
  paths['jsonl'] = tmp_path / 'r.jsonl.gz'
  with gzip.open(paths['jsonl'], 'wt') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  paths['csv'] = tmp_path / 'r.csv'
  with open(paths['csv'], 'w') as f:
    f.write(','.join(GOOD) + '\n')
    for r in records:
      f.write(','.join('' if r[k] is None else str(r[k]) for k in GOOD) + '\n')
  paths['avro'] = tmp_path / 'r.avro'
  with open(paths['avro'], 'wb') as f:
    fastavro.writer(f, fastavro.parse_schema(DATASET.avro_schema()), records)
  paths['parquet'] = tmp_path / 'r.parquet'
  pq.write_table(pa.Table.from_pylist(records), paths['parquet'])
  return paths


def test_all_formats_give_the_same_valid_records(tmp_path):
  records = [_with(transaction_id=f'tx{i:09d}', amount=10.0 + i,
                   is_fraud=None if i == 2 else 0) for i in range(5)]
  records.append(_with(transaction_id='tx000000099', currency='XYZ'))
  for fmt, path in _write_all_formats(tmp_path, records).items():
    with TestPipeline() as p:
      out = p | ReadRecords(str(path), DATASET) | ParseAndValidate(DATASET)
      assert_that(_rows(out[VALID], 'ValidRows') | beam.Map(
          lambda r: (r['transaction_id'], r['amount'], r['is_fraud'],
                     r['event_time'])),
                  equal_to([(f'tx{i:09d}', 10.0 + i, None if i == 2 else 0,
                             GOOD_MICROS) for i in range(5)]),
                  label=f'valid[{fmt}]')
      assert_that(_rows(out[DEAD_LETTER], 'DeadRows') | 'Kind' >> beam.Map(
          lambda r: r['error_kind']),
                  equal_to(['not_allowed']), label=f'dead[{fmt}]')


def test_csv_row_with_wrong_column_count_is_malformed(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_text('a,b\n1,2\n1,2,3\n')
  with TestPipeline() as p:
    raw = p | ReadRecords(str(path), DATASET)
    assert_that(raw | beam.FlatMap(raw_records)
                | beam.Map(lambda r: (r.position, r.error)),
                equal_to([(0, None), (1, 'expected 2 columns, found 3')]))


def test_empty_file_is_zero_records(tmp_path):
  path = tmp_path / 'empty.jsonl'
  path.write_text('')
  with TestPipeline() as p:
    raw = p | ReadRecords(str(path), DATASET)
    assert_that(raw, equal_to([]))


def test_preflight_errors(tmp_path):
  with pytest.raises(InputError, match='matched no files'):
    check_input(str(tmp_path / '*.jsonl'))
  (tmp_path / 'x.txt').write_text('hello')
  with pytest.raises(InputError, match='cannot tell the format'):
    check_input(str(tmp_path / 'x.txt'))
  with pytest.raises(InputError, match='unknown --input_format'):
    check_input(str(tmp_path / 'x.txt'), 'xml')
  assert check_input(str(tmp_path / 'x.txt'), 'jsonl') == [
      str(tmp_path / 'x.txt')]


@pytest.mark.parametrize('line,kind', [
    # A JSON number of 400 digits: too large for a float.
    (json.dumps(_with(amount=10**400)), 'type_error'),
    # Event times a window cannot reach past: year 9999, and year 1
    # with a +14:00 offset.
    (json.dumps(_with(event_time='9999-12-31T23:59:59Z')), 'out_of_range'),
    (json.dumps(_with(event_time='0001-01-01T00:00:00+14:00')),
     'out_of_range'),
    # A key given twice: which value was meant cannot be known.
    (json.dumps(GOOD)[:-1] + ', "amount": 99}', 'malformed'),
    ('[' * 5000 + ']' * 5000, 'malformed'),
])
def test_poison_records_are_dead_letters_not_crashes(tmp_path, line, kind):
  path = _lines(tmp_path / 'poison.jsonl',
                [json.dumps(GOOD), line,
                 json.dumps(_with(transaction_id='tx000000002'))])
  batches = list(read_batches(path, DATASET))
  valid, dead = _batched(batches)
  assert sorted(r['transaction_id'] for r in valid) == [
      'tx000000001', 'tx000000002']
  assert [(d[1], d[2]) for d in dead] == [(1, kind)]
  assert _per_record(batches)[1] == dead


def test_csv_byte_order_mark_and_crlf(tmp_path):
  path = tmp_path / 'bom.csv'
  header = ','.join(GOOD)
  row = ','.join(str(GOOD[k]) for k in GOOD)
  path.write_bytes(b'\xef\xbb\xbf' + f'{header}\r\n{row}\r\n'.encode())
  valid, dead = _batched(read_batches(str(path), DATASET))
  assert dead == []
  assert [r['transaction_id'] for r in valid] == ['tx000000001']


def test_repeated_csv_column_makes_every_row_malformed(tmp_path):
  path = tmp_path / 'twice.csv'
  header = ','.join(list(GOOD) + ['amount'])
  row = ','.join([str(GOOD[k]) for k in GOOD] + ['99'])
  path.write_text(f'{header}\n{row}\n{row}\n')
  valid, dead = _batched(read_batches(str(path), DATASET))
  assert valid == []
  assert [(d[1], d[2]) for d in dead] == [(0, 'malformed'), (1, 'malformed')]
  assert "'amount' appears more than once" in dead[0][4]


@pytest.mark.parametrize('name,cut', [('r.jsonl.gz', 0.6), ('r.avro', 0.6),
                                      ('r.parquet', 0.6), ('r.parquet', 0.0),
                                      ('r.avro', 0.0)])
def test_broken_file_is_one_unreadable_file_row(tmp_path, name, cut):
  """A truncated or empty file: the records before the break are read, and
  one dead-letter row of kind unreadable_file names where it broke."""
  records = [_with(transaction_id=f'tx{i:09d}') for i in range(3000)]
  path = _write_all_formats(tmp_path, records)[name.split('.')[1]]
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * cut)])
  valid, dead = _batched(read_batches(str(path), DATASET))
  assert [d[2] for d in dead] == ['unreadable_file']
  assert 'unreadable from record' in dead[0][4]
  assert len(valid) < 3000
  assert dead[0][1] == len(valid)
  if cut and name != 'r.parquet':
    # A stream keeps what it read before the break (Parquet needs its footer).
    assert len(valid) > 1000


def test_of_two_copies_the_earlier_event_wins_as_in_a_stream(tmp_path):
  """The dedupe rule batch and streaming share: earliest event time, then
  file order. Here the copy later in the file is earlier in event time."""
  late = _with(event_time='2026-10-01T11:00:00Z', amount=1.0)
  early = _with(event_time='2026-10-01T09:00:00Z', amount=2.0)
  _lines(tmp_path / 'a.jsonl', [json.dumps(late), json.dumps(early)])
  with TestPipeline() as p:
    out = (p | ReadRecords(str(tmp_path / 'a.jsonl'), DATASET)
           | ParseAndValidate(DATASET))
    assert_that(_rows(out[VALID], 'ValidRows') | 'Amount' >> beam.Map(
        lambda r: r['amount']), equal_to([2.0]), label='valid')
    assert_that(_rows(out[DEAD_LETTER], 'DeadRows') | 'Where' >> beam.Map(
        lambda r: (r['position'], r['error_kind'])),
                equal_to([(0, 'duplicate')]), label='dead')


@pytest.mark.parametrize('fmt', ['jsonl', 'csv', 'avro', 'parquet'])
def test_a_duplicate_keeps_its_record_text_in_every_format(tmp_path, fmt):
  """The dead-letter row of a duplicate carries the copy's text, read again
  from its file (the text is not carried through the shuffle)."""
  records = [_with(transaction_id=f'tx{i:09d}') for i in range(3)]
  records.append(_with(transaction_id='tx000000001', amount=99.5))
  path = _write_all_formats(tmp_path, records)[fmt]
  with TestPipeline() as p:
    out = (p | ReadRecords(str(path), DATASET)
           | ParseAndValidate(DATASET, num_shards=2))
    assert_that(_rows(out[DEAD_LETTER], 'DeadRows') | 'Text' >> beam.Map(
        lambda r: (r['position'], r['error_kind'], '99.5' in r['raw'],
                   'tx000000001' in r['raw'])),
                equal_to([(3, 'duplicate', True, True)]))


def test_csv_quoted_field_may_span_lines(tmp_path):
  """A quoted value with a newline (and a blank line) in it is one record,
  not a truncated valid record plus an invented malformed one."""
  names = list(GOOD) + ['note']
  row = [str(GOOD[k]) for k in GOOD]
  path = tmp_path / 'notes.csv'
  path.write_text(','.join(names) + '\n' +
                  ','.join(row + ['"first line\n\nthird, with a comma"']) +
                  '\n' + ','.join(
                      [('tx000000002' if k == 'transaction_id' else str(v))
                       for k, v in GOOD.items()] + ['plain']) + '\n')
  batches = list(read_batches(str(path), DATASET))
  valid, dead = _batched(batches)
  assert dead == []
  assert sorted(r['transaction_id'] for r in valid) == [
      'tx000000001', 'tx000000002']
  raws = [r for b in batches for r in raw_records(b)]
  assert [r.position for r in raws] == [0, 1]
  assert raws[0].text.endswith('"first line\n\nthird, with a comma"')


def test_bytes_that_are_not_utf8_are_kept_as_read(tmp_path):
  """A line with bytes that are not UTF-8 is malformed (never a record with
  U+FFFD silently in a value), and its bytes survive in base64."""
  import base64
  bad = json.dumps(_with(transaction_id='tx000000002')).encode().replace(
      b'grocery', b'groc\xffery')
  path = tmp_path / 'latin.jsonl'
  path.write_bytes(json.dumps(GOOD).encode() + b'\n' + bad + b'\n')
  valid, dead = _batched(read_batches(str(path), DATASET))
  assert [r['transaction_id'] for r in valid] == ['tx000000001']
  [(_, position, kind, _, message, raw)] = dead
  assert (position, kind) == (1, 'malformed')
  assert base64.b64decode(message.rsplit(' ', 1)[1]) == bad
  assert '\ufffd' in raw
  streamed = decode_message(bad, 'pubsub:t')
  assert base64.b64decode(streamed.error.rsplit(' ', 1)[1]) == bad


# Patterns: one engine (RE2) on both paths --------------------------------------
PATTERNS = """
name: patterns
roles: {id: id}
fields:
  id: {type: string, required: true}
  code: {type: string, pattern: '(a+)+$'}
  word: {type: string, pattern: 'abc$'}
"""


class _Hung(Exception):
  pass


def _within(seconds, work):
  """work(), or _Hung if it has not returned after `seconds` (a bound on
  a hang, far above the milliseconds the work takes: not a speed test)."""
  import signal

  def hung(*_):
    raise _Hung(f'still running after {seconds} s')

  previous = signal.signal(signal.SIGALRM, hung)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    return work()
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_a_backtracking_pattern_is_decided_by_re2_on_both_paths(tmp_path):
  """`(a+)+$` takes Python's re ~2^40 steps on 40 a's and a '!'; RE2 is
  linear. And 'abc\\n' matches 'abc$' in Python's re but not in RE2: both
  paths must say what RE2 says."""
  schema = tmp_path / 'patterns.yaml'
  schema.write_text(PATTERNS)
  dataset = load_dataset(str(schema))
  hostile = 'a' * 40 + '!'
  path = _lines(tmp_path / 'p.jsonl', [
      json.dumps({'id': '1', 'code': hostile}),
      json.dumps({'id': '2', 'code': 'aaaa', 'word': 'abc'}),
      json.dumps({'id': '3', 'word': 'abc\n'})])
  batches = list(read_batches(path, dataset))

  def both_paths():
    valid, dead = [], []
    for batch in batches:
      good, bad = BatchValidator(dataset).validate(batch)
      valid += [r['id'] for r in good.to_pylist()]
      dead += [(d['position'], d['error_kind'], d['field']) for d in bad]
    single = []
    for batch in batches:
      for raw in raw_records(batch):
        try:
          RecordValidator(dataset).validate(raw)
        except RecordError as e:
          single.append((raw.position, e.kind, e.field))
    return valid, dead, single

  valid, dead, single = _within(30, both_paths)
  assert valid == ['2']
  assert dead == single == [(0, 'pattern_mismatch', 'code'),
                            (2, 'pattern_mismatch', 'word')]
