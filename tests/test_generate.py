"""pipelines.generate: determinism, validity, fraud patterns, broken records,
every writer read back by transforms.read, and the committed sample."""

import collections
import os
import re
import shlex
import subprocess
import sys

import pytest

from pipelines import generate as command
from pipelines.synthetic import transactions as generate
from schemas.dataset import load_dataset
from transforms.history_features import history_features
from transforms.parse import RecordError, RecordValidator
from transforms.read import RawRecord, read_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, 'data', 'sample', 'transactions.jsonl')
SAMPLE_README = os.path.join(REPO, 'data', 'sample', 'README.md')
DATASET = load_dataset()
VALIDATOR = RecordValidator(DATASET)
ROWS = 3000


@pytest.fixture(scope='module')
def clean():
  return generate.generate_transactions(ROWS, seed=11)


def _validate(record):
  return VALIDATOR.validate(RawRecord('mem', 0, '', record))


def _read_back(path, fmt=None):
  """(valid records, {position: error kind}) as the parser would split them,
  duplicates resolved in file order (the generated copies share their
  event time, so ParseAndValidate keeps the same one)."""
  valid, errors, seen = [], {}, set()
  for raw in read_file(path, VALIDATOR.dataset, fmt):
    try:
      record = VALIDATOR.validate(raw)
    except RecordError as e:
      errors[raw.position] = e.kind
      continue
    if record['transaction_id'] in seen:
      errors[raw.position] = 'duplicate'
      continue
    seen.add(record['transaction_id'])
    valid.append(record)
  return valid, errors


# Determinism ---------------------------------------------------------------
def test_same_seed_same_records_other_seed_other_records(clean):
  assert generate.generate_transactions(ROWS, seed=11) == clean
  other = generate.generate_transactions(ROWS, seed=12)
  assert len(other) == len(clean)
  assert other != clean
  assert generate.broken_records(clean, 11, 'jsonl') == (
      generate.broken_records(clean, 11, 'jsonl'))


@pytest.mark.parametrize('name', ['t.jsonl', 't.csv.gz', 't.avro',
                                  't.parquet'])
def test_same_flags_give_byte_identical_files(tmp_path, name):
  paths = [str(tmp_path / f'{i}{name}') for i in range(2)]
  for path in paths:
    assert command.run(['--output', path, '--rows', '500', '--broken',
                         '9']) == 0
  with open(paths[0], 'rb') as a, open(paths[1], 'rb') as b:
    first = a.read()
    assert first == b.read()
  assert len(first) > 1000


# Clean records -------------------------------------------------------------
def test_every_clean_record_is_valid_and_well_formed(clean):
  assert len(clean) == ROWS
  typed = [_validate(r) for r in clean]
  assert [list(r) for r in clean] == [list(DATASET.fields)] * ROWS
  ids = [r['transaction_id'] for r in clean]
  assert ids == [f'tx{i:09d}' for i in range(1, ROWS + 1)]
  keys = [(r['event_time'], r['transaction_id']) for r in typed]
  assert keys == sorted(keys)
  assert all(re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', r['event_time'])
             for r in clean)
  assert clean[0]['event_time'] >= '2026-09-01T00:00:00Z'
  assert clean[-1]['event_time'] < '2026-09-29T00:00:00Z'
  assert all(round(r['amount'], 2) == r['amount'] for r in clean)


def test_users_have_one_currency_and_mostly_stay_home(clean):
  currencies = collections.defaultdict(set)
  countries = collections.defaultdict(collections.Counter)
  for r in clean:
    currencies[r['user_id']].add(r['currency'])
    countries[r['user_id']][r['country']] += 1
  assert all(len(c) == 1 for c in currencies.values())
  at_home = sum(c.most_common(1)[0][1] for c in countries.values())
  assert 0.9 < at_home / ROWS < 0.995
  domain = set(DATASET.fields['country'].domain)
  assert 0.95 < sum(r['country'] in domain for r in clean) / ROWS < 1.0


def test_refunds_are_about_one_percent_and_negative(clean):
  refunds = [r for r in clean if r['channel'] == 'refund']
  assert 0.005 < len(refunds) / ROWS < 0.02
  assert all(r['amount'] < 0 for r in refunds)
  assert all(r['amount'] > 0 for r in clean if r['channel'] != 'refund')


def test_fraud_rate_is_between_one_and_two_percent(clean):
  for records in (clean, generate.generate_transactions(20000, seed=3)):
    rate = sum(r['is_fraud'] for r in records) / len(records)
    assert 0.01 <= rate <= 0.02


def test_fraud_shows_in_the_history_features(clean):
  """Fraud differs from legit on the pipeline's point-in-time features."""
  by_user = collections.defaultdict(list)
  for record in clean:
    by_user[record['user_id']].append(_validate(record))
  rows = []
  for records in by_user.values():
    for record, features in zip(records,
                                history_features(records, DATASET)):
      rows.append(dict(record, **features))

  def mean(field, label):
    values = [r[field] for r in rows if r['is_fraud'] == label]
    return sum(values) / len(values)

  assert mean('user_id_count_1h', 1) > 5 * mean('user_id_count_1h', 0)
  assert mean('user_id_amount_to_mean_7d', 1) > 3 * mean(
      'user_id_amount_to_mean_7d', 0)
  assert mean('user_id_is_new_country_7d', 1) > 3 * mean(
      'user_id_is_new_country_7d', 0)
  assert mean('user_id_is_new_merchant_id_7d', 1) > 1.4 * mean(
      'user_id_is_new_merchant_id_7d', 0)

  def night_share(label):
    hours = [r['event_hour'] for r in rows if r['is_fraud'] == label]
    return sum(h < 6 for h in hours) / len(hours)

  assert night_share(1) > 2.5 * night_share(0)


# Broken records and writers ------------------------------------------------
@pytest.mark.parametrize('name', ['t.jsonl', 't.jsonl.gz', 't.csv',
                                  't.csv.gz', 't.avro', 't.parquet'])
def test_round_trip_rejects_each_broken_record_with_its_kind(
    tmp_path, clean, name):
  fmt = generate.output_format(name)
  broken = generate.broken_records(clean, 11, fmt)
  assert [b.kind for b in broken] == generate.broken_kinds(fmt)
  records = generate.insert_broken(clean, broken)
  assert len(records) == len(clean) + len(broken)
  expected = {}
  for b in broken:
    expected[next(i for i, r in enumerate(records) if r is b.record)] = b.kind
  path = str(tmp_path / name)
  assert generate.write_records(records, path) == fmt

  valid, errors = _read_back(path)

  assert errors == expected
  assert valid == [_validate(r) for r in clean]


def test_text_formats_carry_every_kind_and_typed_formats_most():
  kinds = set(generate.broken_kinds('jsonl'))
  assert kinds == {'malformed', 'missing_required', 'type_error',
                   'out_of_range', 'not_allowed', 'pattern_mismatch',
                   'rule_violation', 'duplicate'}
  assert generate.broken_kinds('csv') == generate.broken_kinds('jsonl')
  assert 'malformed' not in generate.broken_kinds('avro')
  assert len(set(generate.broken_kinds('parquet'))) >= 6


def test_broken_count_cycles_through_the_kinds(clean):
  broken = generate.broken_records(clean, 1, 'avro', count=20)
  kinds = generate.broken_kinds('avro')
  assert [b.kind for b in broken] == (kinds * 3)[:20]
  assert generate.broken_records(clean, 1, 'jsonl', count=0) == []


def test_typed_formats_refuse_text_records(tmp_path):
  with pytest.raises(ValueError, match='malformed text'):
    generate.write_records(['not json'], str(tmp_path / 'x.avro'))


def test_explicit_format_overrides_the_extension(tmp_path, clean):
  path = str(tmp_path / 'records.data')
  generate.write_records(clean[:50], path, 'csv')
  valid, errors = _read_back(path, 'csv')
  assert not errors
  assert valid == [_validate(r) for r in clean[:50]]


# Command line --------------------------------------------------------------
@pytest.mark.parametrize('argv, message', [
    (['--output', 'x.txt'], 'cannot tell the format'),
    (['--output', 'x.jsonl', '--format', 'xml'], "unknown --format 'xml'"),
    (['--output', 'x.avro.gz'], 'drop the .gz'),
    (['--output', 'x.jsonl', '--start', '2026-09-01T00:00:00'], 'time zone'),
    (['--output', 'x.jsonl', '--rows', 'many'], 'invalid int value'),
    (['--output', 'x.jsonl', '--users', '0'], '--users must be'),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    command.run(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and message in err
  assert err.startswith('pipelines.generate: error: ')


def test_an_output_that_cannot_be_written_exits_2_with_one_line(tmp_path,
                                                              capsys):
  # Its folder is a file: writing fails. Exit 1 is the validation gate's
  # code only; a bad --output is bad usage.
  (tmp_path / 'file').write_text('')
  with pytest.raises(SystemExit) as exit_info:
    command.run(['--output', str(tmp_path / 'file' / 'x.jsonl'), '--rows',
                 '10'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1
  assert err.startswith('pipelines.generate: error: cannot write ')


def test_entry_point_reports_bad_format_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'pipelines.generate', '--output',
       str(tmp_path / 'x.xlsx')], cwd=REPO, capture_output=True, text=True,
      check=False)
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      'pipelines.generate: error: cannot tell the format')


# The committed sample ------------------------------------------------------
def _documented_commands():
  with open(SAMPLE_README, encoding='utf-8') as f:
    commands = re.findall(r'^python -m pipelines\.generate (.+)$', f.read(),
                          flags=re.M)
  return [shlex.split(c) for c in commands]


def test_every_sample_is_documented():
  outputs = sorted(argv[argv.index('--output') + 1]
                   for argv in _documented_commands())
  assert outputs == ['data/sample/interactions.jsonl',
                     'data/sample/transactions.jsonl']


@pytest.mark.parametrize('index', [0, 1])
def test_sample_is_what_the_documented_command_generates(tmp_path, index):
  argv = _documented_commands()[index]
  at = argv.index('--output')
  committed = os.path.join(os.path.dirname(SAMPLE_README),
                           os.path.basename(argv[at + 1]))
  argv[at + 1] = str(tmp_path / os.path.basename(committed))
  assert command.run(argv) == 0
  written = [committed]
  if '--schema' in argv:     # interactions: the items table beside it
    written.append(os.path.join(os.path.dirname(committed), 'items.csv'))
  for path in written:
    with open(path, 'rb') as old, open(
        tmp_path / os.path.basename(path), 'rb') as fresh:
      assert old.read() == fresh.read(), path


def test_sample_is_small_and_has_broken_records():
  assert os.path.getsize(SAMPLE) < 5_000_000
  valid, errors = _read_back(SAMPLE)
  assert len(valid) >= 20000
  assert 10 <= len(errors) <= 15
  assert len(set(errors.values())) >= 8
