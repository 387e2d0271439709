"""Parse and validate raw records against the dataset declaration.

`RecordValidator.validate` is a pure function of one RawRecord (easy to test
alone); `ParseAndValidate` applies it in a pipeline, removes duplicate ids
and splits the records into valid records and dead-letter rows. Every record
read leaves through exactly one of the two outputs.
"""

import datetime
import math
import re
from typing import Any, Dict, Optional, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.dataset import Dataset, Field
from transforms.read import RawRecord

NAMESPACE = 'mlpipe'
VALID = 'valid'
DEAD_LETTER = 'dead_letter'

# Every kind of error a dead-letter row can carry.
ERROR_KINDS = ('malformed', 'missing_required', 'type_error', 'out_of_range',
               'not_allowed', 'pattern_mismatch', 'too_long',
               'rule_violation', 'stale', 'duplicate')

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class RecordError(Exception):

  def __init__(self, kind: str, field: Optional[str], message: str):
    super().__init__(message)
    self.kind, self.field, self.message = kind, field, message


def dead_letter_row(raw: RawRecord, kind: str, field: Optional[str],
                    message: str) -> Dict[str, Any]:
  return {'source_file': raw.source, 'position': raw.position,
          'error_kind': kind, 'field': field, 'message': message,
          'raw': raw.text}


def to_micros(value: datetime.datetime) -> int:
  delta = value - _EPOCH
  return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def micros_to_rfc3339(micros: int) -> str:
  value = _EPOCH + datetime.timedelta(microseconds=micros)
  if value.microsecond:
    return value.strftime('%Y-%m-%dT%H:%M:%S.%fZ')
  return value.strftime('%Y-%m-%dT%H:%M:%SZ')


def rfc3339_to_micros(text: str) -> int:
  """'2026-10-01T10:00:00Z' -> epoch microseconds; ValueError if invalid."""
  try:
    return _coerce(Field(name='time', type='timestamp'), text)
  except RecordError:
    raise ValueError(f'{text!r} is not an RFC 3339 timestamp with a time '
                     'zone (e.g. 2026-10-01T10:00:00Z)') from None


def _missing(value) -> bool:
  return value is None or (isinstance(value, str) and not value.strip())


def _coerce(field: Field, value):
  """Converts a decoded value to the declared type or raises RecordError."""
  name, ftype = field.name, field.type
  if ftype == 'string':
    if isinstance(value, str):
      return value
    raise RecordError('type_error', name, f'{name}: expected a string, '
                      f'got {type(value).__name__} {value!r}')
  if ftype in ('float', 'int'):
    if isinstance(value, bool):
      raise RecordError('type_error', name, f'{name}: expected a number, '
                        f'got {value!r}')
    number = value
    if isinstance(value, str):
      try:
        number = float(value.strip())
      except ValueError:
        raise RecordError('type_error', name, f'{name}: {value!r} is not a '
                          'number') from None
    if not isinstance(number, (int, float)):
      raise RecordError('type_error', name, f'{name}: expected a number, got '
                        f'{type(value).__name__}')
    if isinstance(number, float) and not math.isfinite(number):
      raise RecordError('type_error', name, f'{name}: {value!r} is not finite')
    if ftype == 'float':
      return float(number)
    if number != int(number):
      raise RecordError('type_error', name, f'{name}: {value!r} is not an '
                        'integer')
    return int(number)
  # timestamp
  if isinstance(value, datetime.datetime):
    parsed = value
  elif isinstance(value, str):
    text = value.strip()
    if text.endswith(('Z', 'z')):
      text = text[:-1] + '+00:00'
    try:
      parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
      raise RecordError('type_error', name, f'{name}: {value!r} is not an '
                        'RFC 3339 timestamp') from None
  else:
    raise RecordError('type_error', name, f'{name}: expected an RFC 3339 '
                      f'timestamp, got {type(value).__name__}')
  if parsed.tzinfo is None:
    raise RecordError('type_error', name, f'{name}: {value!r} has no time '
                      'zone; use Z or an offset')
  return to_micros(parsed)


def _check(field: Field, value, patterns: Dict[str, Any]):
  name = field.name
  if field.min is not None and value < field.min:
    raise RecordError('out_of_range', name,
                      f'{name}: {value} is below the minimum {field.min}')
  if field.max is not None and value > field.max:
    raise RecordError('out_of_range', name,
                      f'{name}: {value} is above the maximum {field.max}')
  if field.allowed is not None and value not in field.allowed:
    raise RecordError('not_allowed', name,
                      f'{name}: {value!r} is not one of the allowed values')
  if field.max_length is not None and len(value) > field.max_length:
    raise RecordError('too_long', name, f'{name}: longer than '
                      f'{field.max_length} characters')
  pattern = patterns.get(name)
  if pattern is not None and not pattern.match(value):
    raise RecordError('pattern_mismatch', name,
                      f'{name}: {value!r} does not match {field.pattern}')


def _selects(condition: Dict[str, Any], value) -> bool:
  if 'in' in condition and value not in condition['in']:
    return False
  if 'not_in' in condition and value in condition['not_in']:
    return False
  return True


def _satisfies(bounds: Dict[str, float], value) -> bool:
  if value is None:
    return True
  return not (('min' in bounds and value < bounds['min']) or
              ('max' in bounds and value > bounds['max']) or
              ('min_exclusive' in bounds and value <= bounds['min_exclusive'])
              or ('max_exclusive' in bounds and
                  value >= bounds['max_exclusive']))


class RecordValidator:
  """Turns one RawRecord into a typed record dict, or raises RecordError."""

  def __init__(self, dataset: Dataset, reference_micros: Optional[int] = None):
    self.dataset = dataset
    self._reference = reference_micros
    self._patterns = {n: re.compile(f.pattern)
                      for n, f in dataset.fields.items() if f.pattern}

  def validate(self, raw: RawRecord) -> Dict[str, Any]:
    if raw.error is not None:
      raise RecordError('malformed', None, raw.error)
    record = {}
    for name, field in self.dataset.fields.items():
      value = raw.values.get(name)
      if _missing(value):
        if field.required:
          raise RecordError('missing_required', name,
                            f'{name} is required but missing')
        record[name] = None
        continue
      value = _coerce(field, value)
      _check(field, value, self._patterns)
      record[name] = value
    for rule in self.dataset.rules:
      if all(_selects(cond, record[f]) for f, cond in rule.when.items()):
        for f, bounds in rule.require.items():
          if not _satisfies(bounds, record[f]):
            raise RecordError('rule_violation', f,
                              f'rule {rule.name}: {f}={record[f]!r}')
    if self._reference is not None:
      self._check_freshness(record)
    return record

  def _check_freshness(self, record):
    ts = self.dataset.timestamp_field
    age = (self._reference - record[ts]) / 1_000_000
    limits = self.dataset.freshness
    if 'max_age' in limits and age > limits['max_age']:
      raise RecordError('stale', ts, f'{ts} is {age:.0f}s before the '
                        f'reference time (max_age {limits["max_age"]}s)')
    if 'max_future' in limits and -age > limits['max_future']:
      raise RecordError('stale', ts, f'{ts} is {-age:.0f}s after the '
                        f'reference time (max_future {limits["max_future"]}s)')


class ValidateRecords(beam.DoFn):

  def __init__(self, dataset: Dataset, reference_micros: Optional[int]):
    self._dataset = dataset
    self._reference = reference_micros

  def setup(self):
    self._validator = RecordValidator(self._dataset, self._reference)
    self._read = Metrics.counter(NAMESPACE, 'records_read')

  def process(self, raw: RawRecord):
    self._read.inc()
    try:
      record = self._validator.validate(raw)
    except RecordError as e:
      yield beam.pvalue.TaggedOutput(
          DEAD_LETTER, dead_letter_row(raw, e.kind, e.field, e.message))
      return
    yield (record[self._dataset.id_field], (raw, record))


def _first_wins(id_and_copies: Tuple[str, Any]):
  """The copy read first (by file, then position) wins; later copies are
  dead-lettered as duplicates. Deterministic whatever the shuffle order."""
  record_id, copies = id_and_copies
  copies = sorted(copies, key=lambda c: (c[0].source, c[0].position))
  first_raw, record = copies[0]
  yield record
  for raw, _ in copies[1:]:
    yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter_row(
        raw, 'duplicate', None, f'id {record_id} already read at '
        f'{first_raw.source}:{first_raw.position}'))


class CountElements(beam.DoFn):
  """Counts elements into Beam metrics (the run summary reads them)."""

  def __init__(self, name: str, by_kind: bool = False):
    self._name, self._by_kind = name, by_kind

  def setup(self):
    self._counter = Metrics.counter(NAMESPACE, self._name)
    self._kinds = {k: Metrics.counter(NAMESPACE, f'dead_letter.{k}')
                   for k in ERROR_KINDS}

  def process(self, element):
    self._counter.inc()
    if self._by_kind:
      self._kinds[element['error_kind']].inc()
    yield element


class DropDuplicatesInReadOrder(beam.PTransform):
  """PCollection[(id, (RawRecord, dict))] -> {'valid': PCollection[dict],
  'dead_letter': PCollection[dict]}: the copy read first (by file, then
  position) wins, whatever the shuffle order. Bounded input only."""

  def expand(self, keyed):
    return (keyed
            | 'GroupCopiesById' >> beam.GroupByKey()
            | 'KeepFirstCopy' >> beam.FlatMap(_first_wins).with_outputs(
                DEAD_LETTER, main=VALID))


class ParseAndValidate(beam.PTransform):
  """PCollection[RawRecord] -> {'valid': PCollection[dict],
  'dead_letter': PCollection[dict]}.

  A valid record is a dict of every declared field, typed (timestamps as int
  epoch microseconds, missing optional values as None). A dead-letter row is
  {source_file, position, error_kind, field, message, raw}.
  Counters: records_read, records_valid, records_dead_lettered and
  dead_letter.<kind>. With `reference_micros`, records outside the
  declared freshness limits around it are dead-lettered as `stale`.
  `dedupe` removes later copies of an id: by default in read order (batch);
  the streaming pipeline passes its stateful, horizon-bounded one.
  """

  def __init__(self, dataset: Dataset, reference_micros: Optional[int] = None,
               dedupe: Optional[beam.PTransform] = None):
    super().__init__()
    self._dataset = dataset
    self._reference = reference_micros
    self._dedupe = dedupe or DropDuplicatesInReadOrder()

  def expand(self, raw_records):
    parsed = raw_records | 'ParseAndCheckRules' >> beam.ParDo(
        ValidateRecords(self._dataset, self._reference)).with_outputs(
            DEAD_LETTER, main=VALID)
    deduped = parsed[VALID] | 'DropDuplicates' >> self._dedupe
    dead = ((parsed[DEAD_LETTER], deduped[DEAD_LETTER])
            | 'AllDeadLetters' >> beam.Flatten()
            | 'CountDeadLetters' >> beam.ParDo(
                CountElements('records_dead_lettered', by_kind=True)))
    valid = deduped[VALID] | 'CountValid' >> beam.ParDo(
        CountElements('records_valid'))
    return {VALID: valid, DEAD_LETTER: dead}
