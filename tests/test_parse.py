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
from transforms.parse import (DEAD_LETTER, VALID, ParseAndValidate,
                              RecordError, RecordValidator,
                              rfc3339_to_micros)
from transforms.read import InputError, RawRecord, ReadRecords, check_input

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


def _kinds(rows):
  return rows | beam.Map(lambda r: (r['position'], r['error_kind'],
                                    r['raw']))


def test_pipeline_splits_and_first_copy_wins():
  dup = _with(transaction_id='tx000000002')
  raws = [
      _raw(GOOD, position=0),
      _raw(dup, position=3, source='b.jsonl'),
      _raw(dup, position=1, source='a.jsonl'),   # read first: a < b
      _raw(None, 'not valid JSON', position=2),
      _raw(_with(amount='x', transaction_id='tx000000003'), position=4),
  ]
  with TestPipeline() as p:
    out = p | beam.Create(raws) | ParseAndValidate(DATASET)
    assert_that(out[VALID] | 'Ids' >> beam.Map(
        lambda r: r['transaction_id']),
                equal_to(['tx000000001', 'tx000000002']), label='valid')
    assert_that(
        out[DEAD_LETTER] | beam.Map(lambda r: (r['source_file'],
                                               r['position'],
                                               r['error_kind'])),
        equal_to([('b.jsonl', 3, 'duplicate'),
                  ('f.jsonl', 2, 'malformed'),
                  ('f.jsonl', 4, 'type_error')]), label='dead')


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
      out = p | ReadRecords(str(path)) | ParseAndValidate(DATASET)
      assert_that(out[VALID] | beam.Map(
          lambda r: (r['transaction_id'], r['amount'], r['is_fraud'],
                     r['event_time'])),
                  equal_to([(f'tx{i:09d}', 10.0 + i, None if i == 2 else 0,
                             GOOD_MICROS) for i in range(5)]),
                  label=f'valid[{fmt}]')
      assert_that(out[DEAD_LETTER] | beam.Map(lambda r: r['error_kind']),
                  equal_to(['not_allowed']), label=f'dead[{fmt}]')


def test_csv_row_with_wrong_column_count_is_malformed(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_text('a,b\n1,2\n1,2,3\n')
  with TestPipeline() as p:
    raw = p | ReadRecords(str(path))
    assert_that(raw | beam.Map(lambda r: (r.position, r.error)),
                equal_to([(0, None), (1, 'expected 2 columns, found 3')]))


def test_empty_file_is_zero_records(tmp_path):
  path = tmp_path / 'empty.jsonl'
  path.write_text('')
  with TestPipeline() as p:
    raw = p | ReadRecords(str(path))
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
